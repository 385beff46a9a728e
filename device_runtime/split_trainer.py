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
phone cannot classify alone) and no checkpoint: a phone killed mid-round starts the round over
from batch 0. Standard library, numpy and device_runtime only.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.client import SyncClient
from device_runtime.codec import ENCODINGS, ErrorFeedback, UpdateHeader, decode, encode
from device_runtime.engines import Engine, open_engine
from device_runtime.errors import BundleError, CodecError, ProtocolError
from device_runtime.optim import SGD
from device_runtime.preprocess import prepare
from device_runtime.trainer import FEATURE_BATCH, EncodedUpdate, Task, encode_with_feedback, load_shard

LABELS = "labels"
LOSS = "loss"
MAX_REPLY_BYTES = 64 * 1024 * 1024

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
    train_seconds: float  # the phone's compute, the edge's and the link's
    exchange_seconds: float  # of train_seconds, waiting for the edge's answers (link and edge)

    @property
    def compute_seconds(self) -> float:
        """The phone's own compute this round: features (when computed) and its blocks' steps."""
        return self.feature_seconds + self.train_seconds - self.exchange_seconds


def edge_exchange(client: SyncClient) -> Exchange:
    """Batches over HTTP to the aggregator's edge (``PUT /v1/splitfed/batches/{batch}``), with
    the client's credential, retries, backoff and Retry-After (a busy edge answers 503)."""
    return client.splitfed_batch


class SplitTrainer:
    """Trains one phone's shard on a SplitFed bundle (``ort`` engine), with the edge reached
    through ``exchange``."""

    def __init__(
        self,
        bundle: Bundle,
        shard_path: str | Path,
        exchange: Exchange,
        *,
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
        self.error_feedback = ErrorFeedback()
        self._features: np.ndarray | None = None
        self._encoded: EncodedUpdate | None = None
        self._device_key = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "little")

    def run_round(self, task: Task, global_weights: dict[str, np.ndarray]) -> SplitRoundResult:
        """Trains from the global model's tensors of this phone's blocks, batch by batch with
        the edge; ``global_weights`` may hold more tensors (the edge's blocks)."""
        missing = [t.name for t in self.bundle.manifest.trainable if t.name not in global_weights]
        if missing:
            raise ProtocolError(
                f"global model version {task.base_version} lacks {', '.join(missing[:3])}: the bundle does not fit this run"
            )
        base = {t.name: np.asarray(global_weights[t.name], np.float32) for t in self.bundle.manifest.trainable}
        t0 = time.perf_counter()
        h = self.features()
        feature_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        weights, opt = dict(base), SGD(task.lr, momentum=task.momentum)
        self.engine.set_weights(weights)
        n, bs = len(self.labels), task.batch_size
        step, loss_sum, sent, received, waited = 0, 0.0, 0, 0, 0.0
        for epoch in range(task.local_epochs):
            order = self._rng(task, 0, epoch).permutation(n)
            for b in range(0, n, bs):
                idx = order[b : b + bs]
                activation = self.engine.forward(h[idx])
                message = self._activation_message(task, step, activation, self.labels[idx])
                t_send = time.perf_counter()
                reply = self.exchange(step, message)
                waited += time.perf_counter() - t_send
                loss, grad = self._gradient(reply, activation.shape)
                weights = opt.step(weights, self.engine.backward_from(h[idx], grad))
                self.engine.set_weights(weights)
                step, loss_sum = step + 1, loss_sum + loss * len(idx)
                sent, received = sent + len(message), received + len(reply)
        return SplitRoundResult(
            round=task.round,
            update={k: weights[k] - base[k] for k in base},
            num_samples=n,
            steps=step,
            train_loss=loss_sum / (n * task.local_epochs),
            activation_bytes=sent,
            gradient_bytes=received,
            feature_seconds=feature_seconds,
            train_seconds=time.perf_counter() - t0,
            exchange_seconds=waited,
        )

    def encode_update(self, task: Task, result: SplitRoundResult) -> EncodedUpdate:
        """The round's update compressed for pushing (the same bytes and key when asked again)."""
        if self._encoded is not None and self._encoded.round == task.round:
            return self._encoded
        payload, key = encode_with_feedback(
            self.device_id, task, result.num_samples, result.update, self.error_feedback, self._rng(task, 1)
        )
        self._encoded = EncodedUpdate(task.round, payload, key)
        return self._encoded

    def features(self) -> np.ndarray:
        """The frozen part's outputs for every image of the shard (the input itself when nothing is frozen)."""
        if self._features is None:
            spec = self.bundle.manifest.input_spec
            chunks = range(0, len(self.images), FEATURE_BATCH)  # bounds the frozen part's peak memory
            self._features = np.concatenate([self.engine.features(prepare(self.images[i : i + FEATURE_BATCH], spec)) for i in chunks])
        return self._features

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
