"""One phone's SplitFed round: its blocks forward, the edge the rest, the edge's gradient back.

For each batch: the frozen part's features (computed once per shard, kept in memory) → the
trainable blocks forward (``OrtEngine.forward``) → the activation at the cut, encoded (codec
kind "activation", int8 by default) with the labels and sent to the edge under the batch id →
the edge's answer (kind "gradient": d loss / d activation, and the loss) →
``OrtEngine.backward_from`` → a numpy SGD step. The batch id is the step's index in the round:
a retried request whose answer was lost is answered from the edge's cache and never trains
twice; batch 0 (re)starts the phone's round on the edge.

At the end, the update (new − base weights of the phone's trainable tensors) is encoded as
LocalTrainer's is, with error feedback; when the aggregator accepts it, it adds the edge's copy
of the blocks past the cut (``toolkit.splitfed.edge``). There is no held-out evaluation (the
phone cannot classify alone).

Crashes, on either side:

- the phone checkpoints (``device_runtime.local_round.RoundCheckpoint``, as LocalTrainer does)
  after every batch, at the end of the round and with the encoded update before it is pushed.
  Every batch, because the edge keeps only its last batch: a phone resumed at batch s finds
  the edge's last batch at s (the cached answer, no second training) or s − 1 (it trains s),
  and the round goes on as if nothing happened, bit for bit;
- an edge that lost the round (the aggregator restarted) answers a batch past 0 with
  RestartRound: the phone resets its weights and optimizer to the round's base and starts
  over from batch 0 (at most MAX_RESTARTS times in a row, then a ProtocolError). A push whose
  edge part was lost is answered "restart": ``restart_round`` forgets the encoded update and
  its error-feedback residuals, and the round is trained again.

Standard library, numpy and device_runtime only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.client import SyncClient
from device_runtime.codec import ENCODINGS, UpdateHeader, decode, encode
from device_runtime.engines import Engine
from device_runtime.errors import BundleError, CodecError, InternalError, ProtocolError, RestartRound
from device_runtime.local_round import (
    ACTIVATIONS,
    SHUFFLE,
    EncodedUpdate,
    Metrics,
    Position,
    RoundKey,
    RoundRecord,
    RoundTrainer,
    Task,
    Tensors,
    batches,
    update_of,
)
from device_runtime.optim import SGD

LABELS = "labels"
LOSS = "loss"
MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_RESTARTS = 3  # in a row, when the edge keeps losing the round (it keeps restarting)

# Sends one batch's activation message to the edge and returns its gradient message.
Exchange = Callable[[int, bytes], bytes]


@dataclass(frozen=True)
class SplitRoundResult:
    round: int
    update: dict[str, np.ndarray]  # new weights − base weights, the phone's trainable tensors
    num_samples: int
    steps: int
    train_loss: float  # the edge's mean cross-entropy over the round's batches, per sample
    activation_bytes: int  # sent to the edge, this round
    gradient_bytes: int  # received from the edge, this round
    feature_seconds: float
    train_seconds: float  # the phone's compute, the edge's and the link's, summed over processes and restarts
    exchange_seconds: float  # of train_seconds, waiting for the edge's answers (link and edge)
    resumed: bool  # this process continued a checkpointed round
    restarts: int  # times the edge lost the round and it started over from batch 0

    @property
    def compute_seconds(self) -> float:
        """The phone's own compute this round: features (when computed) and its blocks' steps."""
        return self.feature_seconds + self.train_seconds - self.exchange_seconds


def _restarted(stopped: Position) -> Position:
    """The position at batch 0 of a round restarted after ``stopped``: the bytes and time it
    spent stay counted (they were spent) and the restart is counted."""
    return Position(
        train_seconds=stopped.train_seconds,
        activation_bytes=stopped.activation_bytes,
        gradient_bytes=stopped.gradient_bytes,
        exchange_seconds=stopped.exchange_seconds,
        restarts=stopped.restarts + 1,
    )


def edge_exchange(client: SyncClient) -> Exchange:
    """Batches over HTTP to the aggregator's edge (``PUT /v1/splitfed/batches/{batch}``), with
    the client's credential, retries, backoff and Retry-After (a busy edge answers 503)."""
    return client.splitfed_batch


class SplitTrainer(RoundTrainer):
    """Trains one phone's shard on a SplitFed bundle (``ort`` engine), with the edge reached
    through ``exchange``, checkpointing into ``workdir`` (which belongs to this trainer alone)."""

    def __init__(
        self,
        bundle: Bundle,
        shard_path: str | Path,
        exchange: Exchange,
        *,
        workdir: str | Path,
        device_id: str = "phone",
        engine: Engine | None = None,
        encoding: str = "int8",  # of the activations (the edge answers in the same)
    ) -> None:
        manifest = bundle.manifest
        if not manifest.is_splitfed:
            raise BundleError(
                f"bundle {bundle.root} has no edge part (it holds the whole model, or stops at an early exit): "
                "train it with LocalTrainer"
            )
        if encoding not in ENCODINGS:
            raise CodecError(f"activation encoding {encoding!r} is unknown: use one of {', '.join(ENCODINGS)}")
        super().__init__(bundle, shard_path, workdir, engine, device_id, keep_features=False)
        self.exchange = exchange
        self.encoding = encoding
        self.cut_name = manifest.block_names[manifest.plan.cut - 1]  # the activation's name on the wire

    def run_round(self, task: Task, global_weights: dict[str, np.ndarray]) -> SplitRoundResult:
        """Trains from the global model's tensors of this phone's blocks, batch by batch with
        the edge; ``global_weights`` may hold more tensors (the edge's blocks). Continues the
        round from the checkpoint when one of the same task and base is there; starts it over
        from batch 0 (at most MAX_RESTARTS times) when the edge says it lost the round."""
        key, base, fed, record = self.start(task, global_weights)
        if record is not None and record.metrics is not None:  # trained, or encoded too
            return self._result(record, record.metrics, base, resumed=True)
        h, feature_seconds, weights, opt, pos = self.resume(task, record, base, fed)
        resumed = record is not None and record.phase == "training"
        restarts = 0
        while True:
            try:
                weights, pos = self._train(task, key, h, weights, opt, pos)
                break
            except RestartRound as exc:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise ProtocolError(
                        f"the edge lost this phone's round {task.round} {restarts} times in a row ({exc}): "
                        "the aggregator keeps restarting; check its log, then run the phone again"
                    ) from exc
                stopped = self.checkpoint.of(key)  # saved after the last batch trained (batch 0 never restarts)
                if stopped is None:
                    raise InternalError(f"the edge answered restart to batch 0 of round {task.round}") from exc
                weights, opt, pos = dict(base), SGD(task.lr, momentum=task.momentum), _restarted(stopped.position)
        metrics = Metrics(len(self.labels), pos.train_loss, feature_seconds)
        trained = RoundRecord(key, "trained", weights, {}, pos, self.error_feedback.state_dict(), metrics)
        self.checkpoint.save(trained)
        return self._result(trained, metrics, base, resumed)

    def encode_update(self, task: Task, result: SplitRoundResult) -> EncodedUpdate:
        """The round's update compressed for pushing, checkpointed before it is returned; for a
        round already encoded, the same bytes and key again."""
        return self.encode(task, result.num_samples, result.update, restartable=True)

    def restart_round(self, task: Task) -> None:
        """The push was answered "restart" (the edge lost its part of the round): forgets the
        encoded update and its error-feedback residuals, so the next ``run_round`` of ``task``
        trains the round again from batch 0."""
        record = self.checkpoint.record
        if record is None or record.key.task != task or record.phase != "encoded" or record.feedback_before is None:
            raise InternalError(f"restart_round(round {task.round}) called for a round that is not encoded")
        self.error_feedback.load_state_dict(record.feedback_before)
        self.checkpoint.save(RoundRecord(record.key, "restart", {}, {}, Position(), self.error_feedback.state_dict()))

    # -- training --------------------------------------------------------------------------
    def _train(
        self, task: Task, key: RoundKey, h: np.ndarray, weights: Tensors, opt: SGD, pos: Position
    ) -> tuple[Tensors, Position]:
        """The round's batches from ``pos`` on, each checkpointed once stepped."""
        self.engine.set_weights(weights)
        for idx, at in batches(task, len(self.labels), pos, lambda e: self.rng(task, SHUFFLE, e)):
            t0 = time.perf_counter()
            activation = self.engine.forward(h[idx])
            message = self._activation_message(task, pos.step, activation, self.labels[idx])
            t_send = time.perf_counter()
            reply = self.exchange(pos.step, message)
            waited = time.perf_counter() - t_send
            loss, grad = self._gradient(reply, activation.shape)
            weights = opt.step(weights, self.engine.backward_from(h[idx], grad))
            self.engine.set_weights(weights)
            pos = replace(
                pos.after(at, loss, len(idx), time.perf_counter() - t0),
                activation_bytes=pos.activation_bytes + len(message),
                gradient_bytes=pos.gradient_bytes + len(reply),
                exchange_seconds=pos.exchange_seconds + waited,
            )
            # Every batch: the edge keeps only its last batch, so a resumed phone must be at most one
            # batch behind it. Not fsynced (half the cost of a step): after a power cut an older
            # checkpoint is further behind, and the edge answers "restart" rather than train twice.
            record = RoundRecord(key, "training", weights, opt.state_dict(), pos, self.error_feedback.state_dict())
            self.checkpoint.save(record, durable=False)
        return weights, pos

    def _result(self, record: RoundRecord, metrics: Metrics, base: Tensors, resumed: bool) -> SplitRoundResult:
        pos = record.position
        return SplitRoundResult(
            round=record.key.task.round,
            update=update_of(record, base),
            num_samples=metrics.num_samples,
            steps=pos.step,
            train_loss=metrics.train_loss,
            activation_bytes=pos.activation_bytes,
            gradient_bytes=pos.gradient_bytes,
            feature_seconds=metrics.feature_seconds,
            train_seconds=pos.train_seconds,
            exchange_seconds=pos.exchange_seconds,
            resumed=resumed,
            restarts=pos.restarts,
        )

    # -- messages --------------------------------------------------------------------------
    def _activation_message(self, task: Task, step: int, activation: np.ndarray, labels: np.ndarray) -> bytes:
        header = UpdateHeader(self.device_id, task.round, task.base_version, len(labels), kind="activation")
        tensors = {self.cut_name: activation, LABELS: labels.astype(np.float32)}
        return encode(
            header, tensors, {self.cut_name: self.encoding, LABELS: "fp32"}, rng=self.rng(task, ACTIVATIONS, step)
        )

    def _gradient(self, reply: bytes, shape: tuple[int, ...]) -> tuple[float, np.ndarray]:
        try:
            message = decode(reply, expected={self.cut_name: shape, LOSS: ()}, max_bytes=MAX_REPLY_BYTES)
        except CodecError as exc:
            raise ProtocolError(
                f"the edge's answer is not the gradient of this batch ({exc}); the edge may run another model"
            ) from exc
        if message.header.kind != "gradient":
            raise ProtocolError(f"the edge answered a {message.header.kind!r} message, not 'gradient'")
        return float(message.tensors[LOSS]), message.tensors[self.cut_name]
