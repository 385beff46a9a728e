"""A phone's local round as both trainers run it (``LocalTrainer`` in device_runtime.trainer,
``SplitTrainer`` in device_runtime.split_trainer): the aggregator's ``Task``, the record of the
round that is checkpointed (``RoundRecord``), and ``RoundTrainer``, the core both trainers are
built on: the phone's shard, the trainable part's inputs (features), the seeded generators and
the error feedback carried from round to round.

A round starts from the aggregator's base weights with a fresh optimizer (numpy SGD with
momentum), shuffles with a generator seeded by (task seed, round, device) and ends with the
update (new weights − base weights), which is encoded with the codec, error feedback carried
from round to round.

The record says which round it is (``RoundKey``: the task and a digest of its base weights),
its phase ("training" → "trained" → "encoded"; "restart" after a SplitFed push whose edge part
was lost), the weights, optimizer and ``Position`` after the last saved step, the round's
``Metrics`` once trained, the encoded update once encoded, and the error-feedback residuals.
It is one checkpoint file (``device_runtime.checkpoint``), saved as the nested dict of
``RoundRecord.to_dict``. A round resumed from its record ends with the same weights, bit for
bit; once the update is encoded, the same bytes are handed out again, never a retrained,
different update. A record belongs to one task and one set of base weights: a round of anything
else starts over it (so push a round's update before taking the next task); the
error-feedback residuals carry over.

A checkpoint that cannot be read, or holds no record of this layout, raises CheckpointError and
the trainer refuses to start: atomic writes mean a kill never tears a checkpoint, so a bad one is
damaged storage, a hand edit or another runtime's, and silently retraining could push a second,
different update for a round whose update was already pushed. Deleting the file starts the
round over.
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Literal, TypeVar, get_args, get_type_hints

import numpy as np

from device_runtime.bundle import Bundle, sha256_file
from device_runtime.checkpoint import load_checkpoint, save_checkpoint
from device_runtime.codec import ENCODINGS, ErrorFeedback, UpdateHeader, decode, encode, layered_encodings
from device_runtime.engines import Engine, open_engine
from device_runtime.errors import CheckpointError, DataError, InternalError, ProtocolError
from device_runtime.optim import SGD
from device_runtime.preprocess import InputSpec, prepare

if TYPE_CHECKING:
    from device_runtime.engines.inference import FedPart

CHECKPOINT = "trainer.ckpt.npz"
FED = "fed.onnx"  # the bundle role of the fed part (see exporters.bundle, fed_from)
# Images per frozen-part call. ONNX Runtime's arena grows with the batch: on MobileNetV2 at
# 32x32, 16 images cost 2 MB of it and 64 cost 11 MB, at the same speed per image.
FEATURE_BATCH = 16
# The seeded generators' streams (RoundTrainer.rng): shuffling, one generator per epoch (a
# resumed epoch reshuffles the same); the update's stochastic rounding; SplitFed's activations,
# one generator per batch (a message is the same bytes every time it is sent).
SHUFFLE, ROUNDING, ACTIVATIONS = 0, 1, 2

Tensors = dict[str, np.ndarray]
Phase = Literal["training", "trained", "encoded", "restart"]
PHASES: tuple[Phase, ...] = get_args(Phase)
_Scalars = TypeVar("_Scalars")


@dataclass(frozen=True)
class Task:
    """What the aggregator asks of a phone for one round."""

    round: int
    base_version: int
    lr: float
    local_epochs: int
    batch_size: int
    encoding: str  # a codec encoding, or "layered:<average bits>"
    seed: int
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.local_epochs < 1 or self.batch_size < 1 or not 0 <= self.momentum < 1:
            raise ProtocolError(
                f"task {self} asks for an impossible round: lr > 0, local_epochs ≥ 1, batch_size ≥ 1, 0 ≤ momentum < 1"
            )
        if self.encoding not in ENCODINGS and layered_bits(self.encoding) is None:
            raise ProtocolError(
                f"task encoding {self.encoding!r} is unknown: use one of {', '.join(ENCODINGS)} or layered:<bits>"
            )

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


@dataclass(frozen=True)
class EncodedUpdate:
    """The bytes to push and the key that makes pushing them twice harmless."""

    round: int
    payload: bytes
    idempotency_key: str


# -- the record of a round ------------------------------------------------------------------


@dataclass(frozen=True)
class RoundKey:
    """What a checkpointed round belongs to: one task and one set of base weights."""

    task: Task
    base_digest: str

    @classmethod
    def of(cls, task: Task, base_weights: Mapping[str, np.ndarray]) -> RoundKey:
        return cls(task, weights_digest(base_weights))


@dataclass(frozen=True)
class Position:
    """Where a round is after its last step; the defaults are its start."""

    epoch: int = 0
    batch: int = 0  # of the epoch, the next to train
    step: int = 0
    loss_sum: float = 0.0  # of the loss per sample times the samples, over the round's batches
    seen: int = 0  # samples trained on
    train_seconds: float = 0.0
    # SplitFed only: what the exchanges with the edge cost, and how often the edge lost the round
    activation_bytes: int = 0
    gradient_bytes: int = 0
    exchange_seconds: float = 0.0
    restarts: int = 0

    def after(self, at: tuple[int, int], loss: float, samples: int, seconds: float) -> Position:
        """The position after one more step at (epoch, batch) ``at``: a batch of ``samples`` with
        mean ``loss``, trained in ``seconds``."""
        epoch, batch = at
        return replace(
            self,
            epoch=epoch,
            batch=batch,
            step=self.step + 1,
            loss_sum=self.loss_sum + loss * samples,
            seen=self.seen + samples,
            train_seconds=self.train_seconds + seconds,
        )

    @property
    def train_loss(self) -> float:
        """The mean loss per sample over the round's batches so far."""
        return self.loss_sum / self.seen


@dataclass(frozen=True)
class Metrics:
    """A trained round's figures that its position does not hold."""

    num_samples: int  # training samples (a held-out slice excluded)
    train_loss: float
    feature_seconds: float  # frozen-part features: computed, or read from the cache
    eval_loss: float | None = None  # on a held-out slice after training (LocalTrainer)
    eval_accuracy: float | None = None


@dataclass(frozen=True)
class RoundRecord:
    """A round as checkpointed. ``metrics`` is there from phase "trained" on, ``encoded`` in
    phase "encoded"; ``feedback_before`` holds the residuals before the encoding, for a round
    the edge may make the phone train again (SplitTrainer.restart_round)."""

    key: RoundKey
    phase: Phase
    weights: Tensors
    optimizer: Tensors  # the SGD state; it matters mid-round only
    position: Position
    error_feedback: Tensors
    metrics: Metrics | None = None
    encoded: EncodedUpdate | None = None
    feedback_before: Tensors | None = None

    def to_dict(self) -> dict[str, object]:
        """The record as the nested dict ``save_checkpoint`` writes."""
        state: dict[str, object] = {
            "round_key": {"task": self.key.task.to_dict(), "base_digest": self.key.base_digest},
            "phase": self.phase,
            "weights": self.weights,
            "optimizer": self.optimizer,
            "position": asdict(self.position),
            "error_feedback": self.error_feedback,
        }
        if self.metrics is not None:
            state["metrics"] = asdict(self.metrics)
        if self.encoded is not None:
            state["payload"] = self.encoded.payload
            state["idempotency_key"] = self.encoded.idempotency_key
        if self.feedback_before is not None:
            state["feedback_before"] = self.feedback_before
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, object]) -> RoundRecord:
        """The record ``to_dict`` gave; ValueError saying what does not fit when ``state`` is not one.
        Records of earlier runtimes of the same format load too: a position field they lack
        (LocalTrainer's had no edge counters) is at its start."""
        unknown = sorted(state.keys() - _SAVED)
        if unknown:
            raise ValueError(f"unknown fields {', '.join(unknown)}")
        key = _mapping(state.get("round_key"), "round_key")
        digest = key.get("base_digest")
        if key.keys() != {"task", "base_digest"} or not isinstance(digest, str):
            raise ValueError(f"round_key holds {sorted(key)}, not a task and a base_digest")
        task = _scalars(Task, key["task"], "round_key.task")
        phase = _phase(state.get("phase"))
        encoded = None
        if phase == "encoded":
            payload, idempotency_key = state.get("payload"), state.get("idempotency_key")
            if not isinstance(payload, bytes) or not isinstance(idempotency_key, str):
                raise ValueError("an encoded round lacks its payload or idempotency_key")
            encoded = EncodedUpdate(task.round, payload, idempotency_key)
        before = state.get("feedback_before")
        return cls(
            key=RoundKey(task, digest),
            phase=phase,
            weights=_tensors(state.get("weights"), "weights"),
            optimizer=_tensors(state.get("optimizer"), "optimizer"),
            position=_scalars(Position, state.get("position"), "position"),
            error_feedback=_tensors(state.get("error_feedback"), "error_feedback"),
            metrics=_scalars(Metrics, state.get("metrics"), "metrics") if phase in ("trained", "encoded") else None,
            encoded=encoded,
            feedback_before=None if before is None else _tensors(before, "feedback_before"),
        )


_SAVED = {
    "round_key",
    "phase",
    "weights",
    "optimizer",
    "position",
    "error_feedback",
    "metrics",
    "payload",
    "idempotency_key",
    "feedback_before",
}


def _phase(value: object) -> Phase:
    for phase in PHASES:
        if value == phase:
            return phase
    raise ValueError(f"phase {value!r} is none of {', '.join(PHASES)}")


def _mapping(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, not a mapping")
    return value


def _tensors(value: object, what: str) -> Tensors:
    tensors = _mapping(value, what)
    arrays = {name: t for name, t in tensors.items() if isinstance(t, np.ndarray)}
    if len(arrays) != len(tensors):
        raise ValueError(f"{what} holds values that are not arrays")
    return arrays


def _scalars(make: Callable[..., _Scalars], value: object, what: str) -> _Scalars:
    """The dataclass ``make`` of JSON scalars from ``value``; a field it lacks takes its default."""
    given = _mapping(value, what)
    hints = get_type_hints(make)
    unknown = sorted(given.keys() - hints.keys())
    if unknown:
        raise ValueError(f"{what} has unknown fields {', '.join(unknown)}")
    values: dict[str, object] = {}
    for name, v in given.items():
        hint = hints[name]
        allowed = get_args(hint) if isinstance(hint, UnionType) else (hint,)
        if isinstance(v, bool) or not any(isinstance(v, (int, float) if t is float else t) for t in allowed):
            raise ValueError(f"{what}.{name} is {v!r}, not {getattr(hint, '__name__', hint)}")
        values[name] = float(v) if float in allowed and isinstance(v, int) else v
    try:
        return make(**values)
    except (TypeError, ProtocolError) as exc:  # a field missing, or a Task no aggregator could have asked for
        raise ValueError(f"{what}: {exc}") from exc


class RoundCheckpoint:
    """A trainer's round record, as last saved to (or read from) its checkpoint file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state = load_checkpoint(path)
        try:
            self.record = None if state is None else RoundRecord.from_dict(state)
        except ValueError as exc:
            raise CheckpointError(
                f"{path} holds no round record of this runtime ({exc}); the trainer will not resume from it: "
                "delete it to start the round over (its error-feedback residuals are lost)"
            ) from exc

    def of(self, key: RoundKey) -> RoundRecord | None:
        """The saved record of the round ``key``; None when the file holds another round or none."""
        return self.record if self.record is not None and self.record.key == key else None

    def save(self, record: RoundRecord, *, durable: bool = True) -> None:
        """Saves ``record`` atomically (``durable``: see save_checkpoint)."""
        save_checkpoint(self.path, record.to_dict(), durable=durable)
        self.record = record


# -- the core of both trainers ----------------------------------------------------------------


class RoundTrainer:
    """The bundle, its engine and fed part, the phone's shard, the round checkpointed in
    ``workdir`` (which belongs to this trainer alone: one phone, one shard), the error feedback
    restored from it, the features and the seeded generators. ``keep_features`` keeps the
    frozen part's outputs on disk in ``workdir`` (keyed by the bundle hash and the shard digest,
    so later processes train the trainable part only); otherwise in memory only."""

    def __init__(
        self,
        bundle: Bundle,
        shard_path: str | Path,
        workdir: str | Path,
        engine: Engine | None,
        device_id: str,
        *,
        keep_features: bool,
    ) -> None:
        self.bundle = bundle
        self.engine = engine or open_engine(bundle)
        self.device_id = device_id
        self.shard_path = Path(shard_path)
        self.images, self.labels = load_shard(self.shard_path, len(bundle.manifest.label_names))
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = RoundCheckpoint(self.workdir / CHECKPOINT)
        self.error_feedback = ErrorFeedback()
        if self.checkpoint.record is not None:
            self.error_feedback.load_state_dict(self.checkpoint.record.error_feedback)
        self.fed_part = open_fed_part(bundle)
        self._keep_features = keep_features
        self._frozen: np.ndarray | None = None  # the frozen part's outputs
        self._features: tuple[str, np.ndarray] | None = None  # (digest of the fed values, those through the fed part)
        self._device_key = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "little")

    def features(self, fed: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The trainable part's inputs for every image of the shard: the frozen part's outputs
        (the input itself when nothing is frozen), through the fed part with the values ``fed``
        (see start_from)."""
        fed_digest = weights_digest(fed or {})
        if self._features is None or self._features[0] != fed_digest:
            self._features = (fed_digest, through_fed(self.fed_part, self._frozen_features()))
        return self._features[1]

    def rng(self, task: Task, stream: int, *more: int) -> np.random.Generator:
        """The generator of ``stream`` (SHUFFLE, ROUNDING, ACTIVATIONS) for this device's round."""
        return np.random.default_rng([task.seed, task.round, self._device_key, stream, *more])

    def start(
        self, task: Task, global_weights: Mapping[str, np.ndarray]
    ) -> tuple[RoundKey, Tensors, Tensors, RoundRecord | None]:
        """The round's key, its base weights, the values fed to the fed part (see start_from), and
        its record as saved (None when the checkpoint holds another round or none)."""
        base, fed = start_from(self.bundle, self.fed_part, task, global_weights)
        key = RoundKey.of(task, {**base, **fed})
        return key, base, fed, self.checkpoint.of(key)

    def resume(
        self, task: Task, record: RoundRecord | None, base: Tensors, fed: Tensors
    ) -> tuple[np.ndarray, float, Tensors, SGD, Position]:
        """What the round goes on from: the features (see ``features``) and the seconds they
        took, and the weights, optimizer and position saved when ``record`` is of a round in
        training, else the base weights, a fresh optimizer and the start."""
        t0 = time.perf_counter()
        h = self.features(fed)
        feature_seconds = time.perf_counter() - t0
        opt = SGD(task.lr, momentum=task.momentum)
        if record is None or record.phase != "training":
            return h, feature_seconds, {k: np.array(v, dtype=np.float32) for k, v in base.items()}, opt, Position()
        opt.load_state_dict(record.optimizer)
        return (
            h,
            feature_seconds,
            {k: np.array(v, dtype=np.float32) for k, v in record.weights.items()},
            opt,
            record.position,
        )

    def encode(self, task: Task, num_samples: int, update: Tensors, *, restartable: bool = False) -> EncodedUpdate:
        """A trained round's update encoded with feedback and checkpointed (phase "encoded") before
        it is returned; for a round already encoded, the same bytes and key again. ``restartable``
        keeps the residuals before the encoding in the record, for training the round again."""
        record = self.checkpoint.record
        if record is None or record.key.task != task or record.metrics is None:
            raise InternalError(f"encode_update(round {task.round}) called before run_round finished that task")
        if record.encoded is not None:
            return record.encoded
        before = self.error_feedback.state_dict() if restartable else None
        payload, key = encode_with_feedback(
            self.device_id, task, num_samples, update, self.error_feedback, self.rng(task, ROUNDING)
        )
        encoded = EncodedUpdate(task.round, payload, key)
        self.checkpoint.save(
            replace(
                record,
                phase="encoded",
                optimizer={},
                error_feedback=self.error_feedback.state_dict(),
                encoded=encoded,
                feedback_before=before,
            )
        )
        return encoded

    def _frozen_features(self) -> np.ndarray:
        if self._frozen is None:
            self._frozen = self._cached_features() if self._keep_features else self._compute_features()
        return self._frozen

    def _compute_features(self) -> np.ndarray:
        return frozen_features(self.engine, self.images, self.bundle.manifest.input_spec)

    def _cached_features(self) -> np.ndarray:
        digest = sha256_file(self.shard_path)
        path = self.workdir / f"features-{self.bundle.bundle_hash[:16]}-{digest[:16]}.npy"
        try:
            cached: np.ndarray = np.load(path, allow_pickle=False)
            if cached.dtype == np.float32 and len(cached) == len(self.labels):
                return cached
        except (OSError, ValueError, EOFError):  # absent or damaged: it is only a cache, recompute it
            pass
        h = self._compute_features()
        for old in [*self.workdir.glob("features-*.npy"), *self.workdir.glob(".features-*.tmp")]:
            old.unlink()  # caches of earlier bundles or shards, and writes cut short by a kill
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, h)
        os.replace(tmp, path)
        return h


def update_of(record: RoundRecord, base: Tensors) -> Tensors:
    """A round's update: its weights − the base weights."""
    return {k: np.asarray(w, np.float32) - np.asarray(base[k], np.float32) for k, w in record.weights.items()}


def batches(
    task: Task, n: int, pos: Position, shuffle: Callable[[int], np.random.Generator]
) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """A round's batches of ``n`` samples from position ``pos`` on: each batch's sample indices
    and the (epoch, batch) position after it. ``shuffle(epoch)`` gives the epoch's generator, so
    a resumed epoch is shuffled as it was."""
    bs = task.batch_size
    count = -(-n // bs)
    for epoch in range(pos.epoch, task.local_epochs):
        order = shuffle(epoch).permutation(n)
        for b in range(pos.batch if epoch == pos.epoch else 0, count):
            yield order[b * bs : (b + 1) * bs], ((epoch, b + 1) if b + 1 < count else (epoch + 1, 0))


def frozen_features(engine: Engine, images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The frozen part's outputs for every image, FEATURE_BATCH at a time, filled into one
    array: the phone holds them once, never a list of batches beside their concatenation."""
    first = engine.features(prepare(images[:FEATURE_BATCH], spec))
    h = np.empty((len(images), *first.shape[1:]), dtype=np.float32)
    h[: len(first)] = first
    for i in range(FEATURE_BATCH, len(images), FEATURE_BATCH):
        out = engine.features(prepare(images[i : i + FEATURE_BATCH], spec))
        h[i : i + len(out)] = out
    return h


def open_fed_part(bundle: Bundle) -> FedPart | None:
    """The bundle's fed part (``fed.onnx``: frozen blocks other phones of the run train), or None."""
    if not bundle.has(FED):
        return None
    from device_runtime.engines.inference import FedPart  # inference on ONNX Runtime, whichever engine trains

    return FedPart(bundle.path(FED))


def start_from(
    bundle: Bundle, fed_part: FedPart | None, task: Task, global_weights: Mapping[str, np.ndarray]
) -> tuple[Tensors, Tensors]:
    """A round's base weights (the bundle's trainable tensors of the global model) and the global
    values fed to the fed part (without them the phone would learn on features of weights the
    run has moved away from)."""
    missing = [t.name for t in bundle.manifest.trainable if t.name not in global_weights]
    if missing:
        raise ProtocolError(
            f"global model version {task.base_version} lacks {', '.join(missing[:3])}: the bundle does not fit this run"
        )
    base = {t.name: np.asarray(global_weights[t.name], np.float32) for t in bundle.manifest.trainable}
    return base, fed_part.feed(global_weights) if fed_part is not None else {}


def through_fed(fed_part: FedPart | None, h: np.ndarray) -> np.ndarray:
    """The frozen part's outputs through the fed part (as they are when there is none)."""
    if fed_part is None:
        return h
    return np.concatenate([fed_part.run(h[i : i + FEATURE_BATCH]) for i in range(0, len(h), FEATURE_BATCH)])


def encode_with_feedback(
    device_id: str,
    task: Task,
    num_samples: int,
    update: Tensors,
    error_feedback: ErrorFeedback,
    rng: np.random.Generator,
) -> tuple[bytes, str]:
    """A round's update encoded as the task says, with error feedback (the residual of this
    encoding is kept for the next round), and its idempotency key: the same bytes give the
    same key, so a re-push after a restart is recognised as a duplicate."""
    header = UpdateHeader(device_id, task.round, task.base_version, num_samples, kind="delta")
    compensated = error_feedback.compensate(update)
    bits = layered_bits(task.encoding)
    encoding = task.encoding if bits is None else layered_encodings(compensated, bits)
    payload = encode(header, compensated, encoding, rng=rng)
    error_feedback.record(compensated, decode(payload).tensors)
    return payload, f"{device_id}:{task.round}:{hashlib.sha256(payload).hexdigest()[:16]}"


def layered_bits(encoding: str) -> float | None:
    """The average bits of a ``"layered:<bits>"`` encoding; None for anything else."""
    try:
        return float(encoding.removeprefix("layered:")) if encoding.startswith("layered:") else None
    except ValueError:
        return None


def load_shard(path: str | Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A phone's data shard: ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data shard {path} does not exist: deploy the phone's shard first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted({"images", "labels"} - set(npz.files))
            if missing:
                raise DataError(
                    f"data shard {path} lacks {' and '.join(missing)}: a shard holds 'images' and 'labels'; "
                    "re-create it"
                )
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"data shard {path} is corrupt or not an .npz ({exc}); re-create it") from exc
    if (
        images.dtype != np.uint8
        or images.ndim != 3
        or labels.ndim != 1
        or len(images) != len(labels)
        or len(labels) == 0
    ):
        raise DataError(
            f"data shard {path} holds images {images.dtype}{images.shape} and labels {labels.dtype}{labels.shape}; "
            "want uint8 (N, H, W) images and N labels, N ≥ 1: re-create it"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"data shard {path} has labels outside 0..{num_classes - 1}: re-create it for this model")
    return images, labels.astype(np.int64)


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes and float32 bytes: identifies a set of base weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(f"{name}{w.shape}".encode())
        h.update(w.tobytes())
    return h.hexdigest()
