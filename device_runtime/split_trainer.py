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

- the phone checkpoints (``device_runtime.checkpoint.RoundCheckpoint``, as LocalTrainer does)
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

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.checkpoint import RoundCheckpoint
from device_runtime.client import SyncClient
from device_runtime.codec import ENCODINGS, ErrorFeedback, UpdateHeader, decode, encode
from device_runtime.engines import Engine, open_engine
from device_runtime.errors import BundleError, CodecError, InternalError, ProtocolError, RestartRound
from device_runtime.optim import SGD
from device_runtime.trainer import (
    CHECKPOINT, EncodedUpdate, Task, batches, encode_checkpointed, frozen_features, load_shard, open_fed_part, round_key,
    start_from, through_fed, weights_digest,
)  # fmt: skip

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


SPENT = ("activation_bytes", "gradient_bytes", "train_seconds", "exchange_seconds")


def _start(stopped: dict | None = None) -> dict:
    """The position at batch 0 of a round; restarted after ``stopped``, the bytes and time it
    spent stay counted (they were spent) and the restart is counted."""
    if stopped is None:
        return {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, **dict.fromkeys(SPENT, 0), "restarts": 0}
    return {**_start(), **{k: stopped[k] for k in SPENT}, "restarts": stopped["restarts"] + 1}


def edge_exchange(client: SyncClient) -> Exchange:
    """Batches over HTTP to the aggregator's edge (``PUT /v1/splitfed/batches/{batch}``), with
    the client's credential, retries, backoff and Retry-After (a busy edge answers 503)."""
    return client.splitfed_batch


class SplitTrainer:
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
    ):
        manifest = bundle.manifest
        if not manifest.is_splitfed:
            raise BundleError(f"bundle {bundle.root} holds the whole model (no cut before the last block): train it with LocalTrainer")
        if encoding not in ENCODINGS:
            raise CodecError(f"activation encoding {encoding!r} is unknown: use one of {', '.join(ENCODINGS)}")
        self.bundle = bundle
        self.engine = engine or open_engine(bundle)
        self.exchange = exchange
        self.device_id = device_id
        self.encoding = encoding
        self.cut_name = manifest.block_names[manifest.plan.cut - 1]  # the activation's name on the wire
        self.images, self.labels = load_shard(shard_path, len(manifest.label_names))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.checkpoint = RoundCheckpoint(Path(workdir) / CHECKPOINT)
        self.error_feedback = ErrorFeedback()
        if "error_feedback" in self.checkpoint.state:
            self.error_feedback.load_state_dict(self.checkpoint.state["error_feedback"])
        self.fed_part = open_fed_part(bundle)
        self._frozen: np.ndarray | None = None  # the frozen part's outputs
        self._features: tuple[str, np.ndarray] | None = None  # (digest of the fed values, those through the fed part)
        self._device_key = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "little")

    def run_round(self, task: Task, global_weights: dict[str, np.ndarray]) -> SplitRoundResult:
        """Trains from the global model's tensors of this phone's blocks, batch by batch with
        the edge; ``global_weights`` may hold more tensors (the edge's blocks). Continues the
        round from the checkpoint when one of the same task and base is there; starts it over
        from batch 0 (at most MAX_RESTARTS times) when the edge says it lost the round."""
        base, fed = start_from(self.bundle, self.fed_part, task, global_weights)
        key = round_key(task, {**base, **fed})
        phase = self.checkpoint.phase(key)
        if phase in ("trained", "encoded"):
            return self._result(base, resumed=True)
        t0 = time.perf_counter()
        h = self.features(fed)
        feature_seconds = time.perf_counter() - t0

        opt = SGD(task.lr, momentum=task.momentum)
        if phase == "training":  # continue at the saved batch
            st = self.checkpoint.state
            weights = {k: np.array(v, dtype=np.float32) for k, v in st["weights"].items()}
            opt.load_state_dict(st["optimizer"])
            pos = st["position"]
        else:
            weights, pos = dict(base), _start()
        restarts = 0
        while True:
            try:
                weights, pos = self._train(task, key, h, weights, opt, pos)
                break
            except RestartRound as exc:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise ProtocolError(
                        f"the edge lost this phone's round {task.round} {restarts} times in a row ({exc}): the aggregator keeps "
                        "restarting; check its log, then run the phone again"
                    ) from exc
                stopped = self.checkpoint.state["position"]  # saved after the last batch trained (batch 0 never restarts)
                weights, opt, pos = dict(base), SGD(task.lr, momentum=task.momentum), _start(stopped)
        metrics = {"num_samples": len(self.labels), "train_loss": pos["loss_sum"] / pos["seen"], "feature_seconds": feature_seconds}
        self.checkpoint.save(key, "trained", weights, {}, pos, self.error_feedback.state_dict(), metrics=metrics)
        return self._result(base, resumed=phase == "training")

    def encode_update(self, task: Task, result: SplitRoundResult) -> EncodedUpdate:
        """The round's update compressed for pushing, checkpointed before it is returned; for a
        round already encoded, the same bytes and key again."""
        return encode_checkpointed(
            self.checkpoint, self.device_id, task, result.num_samples, result.update, self.error_feedback, self._rng(task, 1),
            feedback_before=self.error_feedback.state_dict(),  # for restart_round
        )  # fmt: skip

    def restart_round(self, task: Task) -> None:
        """The push was answered "restart" (the edge lost its part of the round): forgets the
        encoded update and its error-feedback residuals, so the next ``run_round`` of ``task``
        trains the round again from batch 0."""
        st = self.checkpoint.state
        if st.get("round_key", {}).get("task") != task.to_dict() or st.get("phase") != "encoded":
            raise InternalError(f"restart_round(round {task.round}) called for a round that is not encoded")
        self.error_feedback.load_state_dict(st["feedback_before"])
        self.checkpoint.save(st["round_key"], "restart", {}, {}, {}, self.error_feedback.state_dict())

    def features(self, fed: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The trainable part's inputs for every image of the shard: the frozen part's outputs
        (the input itself when nothing is frozen), through the fed part with the values ``fed``
        (see start_from)."""
        if self._frozen is None:
            self._frozen = frozen_features(self.engine, self.images, self.bundle.manifest.input_spec)
        fed_digest = weights_digest(fed or {})
        if self._features is None or self._features[0] != fed_digest:
            self._features = (fed_digest, through_fed(self.fed_part, self._frozen))
        return self._features[1]

    # -- training --------------------------------------------------------------------------
    def _train(self, task: Task, key: dict, h: np.ndarray, weights: dict, opt: SGD, pos: dict) -> tuple[dict, dict]:
        """The round's batches from ``pos`` on, each checkpointed once stepped."""
        self.engine.set_weights(weights)
        for idx, (epoch, batch) in batches(task, len(self.labels), pos, lambda e: self._rng(task, 0, e)):
            t0 = time.perf_counter()
            activation = self.engine.forward(h[idx])
            message = self._activation_message(task, pos["step"], activation, self.labels[idx])
            t_send = time.perf_counter()
            reply = self.exchange(pos["step"], message)
            waited = time.perf_counter() - t_send
            loss, grad = self._gradient(reply, activation.shape)
            weights = opt.step(weights, self.engine.backward_from(h[idx], grad))
            self.engine.set_weights(weights)
            pos = {
                **pos,
                "epoch": epoch,
                "batch": batch,
                "step": pos["step"] + 1,
                "loss_sum": pos["loss_sum"] + loss * len(idx),
                "seen": pos["seen"] + len(idx),
                "activation_bytes": pos["activation_bytes"] + len(message),
                "gradient_bytes": pos["gradient_bytes"] + len(reply),
                "exchange_seconds": pos["exchange_seconds"] + waited,
                "train_seconds": pos["train_seconds"] + time.perf_counter() - t0,
            }
            # Every batch: the edge keeps only its last batch, so a resumed phone must be at most one
            # batch behind it. Not fsynced (half the cost of a step): after a power cut an older
            # checkpoint is further behind, and the edge answers "restart" rather than train twice.
            self.checkpoint.save(key, "training", weights, opt.state_dict(), pos, self.error_feedback.state_dict(), durable=False)
        return weights, pos

    def _result(self, base: dict[str, np.ndarray], resumed: bool) -> SplitRoundResult:
        st = self.checkpoint.state
        m, pos = st["metrics"], st["position"]
        return SplitRoundResult(
            round=st["round_key"]["task"]["round"],
            update={k: np.asarray(w, np.float32) - base[k] for k, w in st["weights"].items()},
            num_samples=m["num_samples"],
            steps=pos["step"],
            train_loss=m["train_loss"],
            activation_bytes=pos["activation_bytes"],
            gradient_bytes=pos["gradient_bytes"],
            feature_seconds=m["feature_seconds"],
            train_seconds=pos["train_seconds"],
            exchange_seconds=pos["exchange_seconds"],
            resumed=resumed,
            restarts=pos["restarts"],
        )

    # -- messages --------------------------------------------------------------------------
    def _activation_message(self, task: Task, step: int, activation: np.ndarray, labels: np.ndarray) -> bytes:
        header = UpdateHeader(self.device_id, task.round, task.base_version, len(labels), kind="activation")
        tensors = {self.cut_name: activation, LABELS: labels.astype(np.float32)}
        return encode(header, tensors, {self.cut_name: self.encoding, LABELS: "fp32"}, rng=self._rng(task, 2, step))

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

    def _rng(self, task: Task, stream: int, *more: int) -> np.random.Generator:
        # stream 0: shuffling, one generator per epoch; 1: the update's stochastic rounding;
        # 2: the activations' (one generator per batch, so a message is the same bytes every time)
        return np.random.default_rng([task.seed, task.round, self._device_key, stream, *more])
