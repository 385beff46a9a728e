"""One phone's local round: features once, then epochs of SGD on the trainable head.

The frozen part of the bundle runs once per shard: its outputs (features) are cached in the
work folder, keyed by the bundle hash and the shard digest, so every later round trains the
trainable part only. A round starts from the aggregator's base weights with a fresh optimizer
(numpy SGD with momentum), shuffles with a generator seeded by (task seed, round, device), and
returns the update (new weights − base weights). ``encode_update`` then compresses it with
the codec, error feedback carried from round to round.

Checkpoints (``device_runtime.checkpoint``): every ``checkpoint_every`` steps, at the end of
the round, and once more with the encoded update and its idempotency key before it is
handed out for pushing. A killed trainer resumes at the last checkpoint and ends with the
same weights, bit for bit; after the update is encoded, the same bytes are handed out again,
never a retrained, different update. A checkpoint belongs to one task and one set of base
weights: ``run_round`` with anything else starts a new round over it (so push a round's update
before taking the next task); the error-feedback residuals carry over.

A checkpoint that cannot be read raises CheckpointError and the trainer refuses to start:
atomic writes mean a kill never tears a checkpoint, so a bad one is damaged storage or a
hand edit, and silently retraining could push a second, different update for a round whose
update was already pushed. Deleting the file starts the round over.
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from device_runtime.bundle import Bundle, sha256_file
from device_runtime.checkpoint import RoundCheckpoint
from device_runtime.codec import ENCODINGS, ErrorFeedback, UpdateHeader, decode, encode, layered_encodings
from device_runtime.engines import Engine, open_engine
from device_runtime.errors import BundleError, DataError, FedkitError, InternalError, ProtocolError
from device_runtime.optim import SGD
from device_runtime.preprocess import InputSpec, prepare

if TYPE_CHECKING:
    from device_runtime.engines.inference import FedPart

CHECKPOINT = "trainer.ckpt.npz"
FED = "fed.onnx"  # the bundle role of the fed part (see exporters.bundle, fed_from)
# Images per frozen-part call. ONNX Runtime's arena grows with the batch: on MobileNetV2 at
# 32x32, 16 images cost 2 MB of it and 64 cost 11 MB, at the same speed per image.
FEATURE_BATCH = 16


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

    def __post_init__(self):
        if self.lr <= 0 or self.local_epochs < 1 or self.batch_size < 1 or not 0 <= self.momentum < 1:
            raise ProtocolError(
                f"task {self} asks for an impossible round: lr > 0, local_epochs ≥ 1, batch_size ≥ 1, 0 ≤ momentum < 1"
            )
        if self.encoding not in ENCODINGS and layered_bits(self.encoding) is None:
            raise ProtocolError(f"task encoding {self.encoding!r} is unknown: use one of {', '.join(ENCODINGS)} or layered:<bits>")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RoundResult:
    round: int
    update: dict[str, np.ndarray]  # new weights − base weights
    num_samples: int  # training samples (the held-out slice excluded)
    steps: int
    train_loss: float  # mean cross-entropy over the round's batches, per sample
    eval_loss: float | None  # on the held-out slice after training; None when nothing is held out
    eval_accuracy: float | None
    feature_seconds: float  # frozen-part features: computed, or read from the cache
    train_seconds: float  # the optimisation steps, summed over restarts
    resumed: bool  # this process continued a checkpointed round


@dataclass(frozen=True)
class EncodedUpdate:
    """The bytes to push and the key that makes pushing them twice harmless."""

    round: int
    payload: bytes
    idempotency_key: str


class LocalTrainer:
    """Trains one phone's shard on a verified bundle, checkpointing into ``workdir`` (which
    belongs to this trainer alone: one phone, one shard)."""

    def __init__(
        self,
        bundle: Bundle,
        shard_path: str | Path,
        workdir: str | Path,
        engine: Engine | None = None,
        *,
        device_id: str = "phone",
        holdout_fraction: float = 0.1,  # of the shard, a fixed random slice for local evaluation
        checkpoint_every: int = 50,  # optimizer steps
    ):
        if bundle.manifest.is_splitfed:
            raise BundleError(
                f"bundle {bundle.root} is SplitFed (cut {bundle.manifest.plan.cut} of {len(bundle.manifest.block_names)} blocks): "
                "its rounds need the edge; LocalTrainer trains bundles that hold the whole model"
            )
        if not 0 <= holdout_fraction < 1 or checkpoint_every < 1:
            raise FedkitError(
                f"holdout_fraction={holdout_fraction}, checkpoint_every={checkpoint_every}: "
                "use 0 ≤ holdout_fraction < 1 and checkpoint_every ≥ 1"
            )
        self.bundle = bundle
        self.engine = engine or open_engine(bundle)
        self.device_id = device_id
        self.checkpoint_every = checkpoint_every
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.workdir / CHECKPOINT
        self.shard_path = Path(shard_path)
        self.images, self.labels = load_shard(self.shard_path, len(bundle.manifest.label_names))
        n = len(self.labels)
        held = np.sort(np.random.default_rng(0).permutation(n)[: int(n * holdout_fraction)])
        self.eval_index = held
        self.train_index = np.setdiff1d(np.arange(n), held)
        if len(self.train_index) == 0:
            raise DataError(f"shard {self.shard_path} has {n} images, none left to train on: lower holdout_fraction")
        self.checkpoint = RoundCheckpoint(self.checkpoint_path)
        self.error_feedback = ErrorFeedback()
        if "error_feedback" in self.checkpoint.state:
            self.error_feedback.load_state_dict(self.checkpoint.state["error_feedback"])
        self.fed_part = open_fed_part(bundle)
        self._frozen: np.ndarray | None = None  # the frozen part's outputs
        self._features: tuple[str, np.ndarray] | None = None  # (digest of the fed values, those through the fed part)
        self._device_key = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "little")

    # -- a round ---------------------------------------------------------------------------
    def run_round(self, task: Task, global_weights: dict[str, np.ndarray]) -> RoundResult:
        """Trains from the global model's tensors (``global_weights``: this bundle's trainable
        ones, and those its frozen part is fed) as ``task`` says and returns the update;
        continues the round from the checkpoint when one of the same task and base is there."""
        base_weights, fed = start_from(self.bundle, self.fed_part, task, global_weights)
        key = round_key(task, {**base_weights, **fed})
        st, phase = self.checkpoint.state, self.checkpoint.phase(key)
        same = phase is not None
        if phase in ("trained", "encoded"):
            return self._result(st, base_weights, resumed=True)

        t0 = time.perf_counter()
        h = self.features(fed)
        feature_seconds = time.perf_counter() - t0
        opt = SGD(task.lr, momentum=task.momentum)
        if same:  # phase "training": continue at the saved batch
            weights = {k: np.array(v, dtype=np.float32) for k, v in st["weights"].items()}
            opt.load_state_dict(st["optimizer"])
            pos = st["position"]
        else:
            weights = {k: np.array(v, dtype=np.float32) for k, v in base_weights.items()}
            pos = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "train_seconds": 0.0}
        self.engine.set_weights(weights)

        n = len(self.train_index)
        t0 = time.perf_counter()
        for picked, (epoch, batch) in batches(task, n, pos, lambda e: self._rng(task, 0, e)):
            idx = self.train_index[picked]  # gathered per batch: no copy of all features
            loss, grads = self.engine.gradients(h[idx], self.labels[idx])
            weights = opt.step(weights, grads)
            self.engine.set_weights(weights)
            pos = {
                "epoch": epoch,
                "batch": batch,
                "step": pos["step"] + 1,
                "loss_sum": pos["loss_sum"] + float(loss) * len(idx),
                "seen": pos["seen"] + len(idx),
                "train_seconds": pos["train_seconds"] + time.perf_counter() - t0,
            }
            t0 = time.perf_counter()
            if pos["step"] % self.checkpoint_every == 0:
                self._save(key, "training", weights, opt, pos)

        eval_loss, eval_accuracy = self._evaluate(h)
        metrics = {
            "num_samples": n,
            "train_loss": pos["loss_sum"] / pos["seen"],
            "eval_loss": eval_loss,
            "eval_accuracy": eval_accuracy,
            "feature_seconds": feature_seconds,
        }
        self._save(key, "trained", weights, opt, pos, metrics=metrics)
        return self._result(self.checkpoint.state, base_weights, resumed=same)

    def encode_update(self, task: Task, result: RoundResult) -> EncodedUpdate:
        """The round's update compressed for pushing, checkpointed before it is returned; for a
        round already encoded, the same bytes and key again."""
        return encode_checkpointed(
            self.checkpoint, self.device_id, task, result.num_samples, result.update, self.error_feedback, self._rng(task, 1)
        )

    # -- features and evaluation -----------------------------------------------------------
    def features(self, fed: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The trainable part's inputs for every image of the shard: the frozen part's outputs
        (cached on disk), through the fed part with the values ``fed`` (see start_from)."""
        fed_digest = weights_digest(fed or {})
        if self._features is None or self._features[0] != fed_digest:
            self._features = (fed_digest, through_fed(self.fed_part, self._frozen_features()))
        return self._features[1]

    def _frozen_features(self) -> np.ndarray:
        if self._frozen is not None:
            return self._frozen
        digest = sha256_file(self.shard_path)
        path = self.workdir / f"features-{self.bundle.bundle_hash[:16]}-{digest[:16]}.npy"
        try:
            h = np.load(path, allow_pickle=False)
            if h.dtype != np.float32 or len(h) != len(self.labels):
                raise ValueError(f"cached features have shape {h.shape} and dtype {h.dtype}")
        except (OSError, ValueError, EOFError):  # absent or damaged: it is only a cache, recompute it
            h = self._compute_features()
            for old in [*self.workdir.glob("features-*.npy"), *self.workdir.glob(".features-*.tmp")]:
                old.unlink()  # caches of earlier bundles or shards, and writes cut short by a kill
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, h)
            os.replace(tmp, path)
        self._frozen = h
        return h

    def _compute_features(self) -> np.ndarray:
        return frozen_features(self.engine, self.images, self.bundle.manifest.input_spec)

    def _evaluate(self, h: np.ndarray) -> tuple[float | None, float | None]:
        if len(self.eval_index) == 0:
            return None, None
        logits = np.concatenate(
            [self.engine.forward(h[self.eval_index[i : i + FEATURE_BATCH]]) for i in range(0, len(self.eval_index), FEATURE_BATCH)]
        ).astype(np.float64)
        y = self.labels[self.eval_index]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())

    # -- state -----------------------------------------------------------------------------
    def _rng(self, task: Task, stream: int, *more: int) -> np.random.Generator:
        # stream 0: shuffling (one generator per epoch, so a resumed epoch reshuffles the same);
        # stream 1: the codec's stochastic rounding
        return np.random.default_rng([task.seed, task.round, self._device_key, stream, *more])

    def _save(self, round_key, phase, weights, opt, pos, **extra) -> None:
        self.checkpoint.save(round_key, phase, weights, opt.state_dict(), pos, self.error_feedback.state_dict(), **extra)

    def _result(self, st: dict[str, Any], base_weights: dict[str, np.ndarray], resumed: bool) -> RoundResult:
        m, pos = st["metrics"], st["position"]
        return RoundResult(
            round=st["round_key"]["task"]["round"],
            update={k: (np.asarray(w, np.float32) - np.asarray(base_weights[k], np.float32)) for k, w in st["weights"].items()},
            num_samples=m["num_samples"],
            steps=pos["step"],
            train_loss=m["train_loss"],
            eval_loss=m["eval_loss"],
            eval_accuracy=m["eval_accuracy"],
            feature_seconds=m["feature_seconds"],
            train_seconds=pos["train_seconds"],
            resumed=resumed,
        )


def batches(
    task: Task, n: int, pos: dict[str, Any], shuffle: Callable[[int], np.random.Generator]
) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """A round's batches of ``n`` samples from position ``pos`` on: each batch's sample indices
    and the (epoch, batch) position after it. ``shuffle(epoch)`` gives the epoch's generator, so
    a resumed epoch is shuffled as it was."""
    bs = task.batch_size
    count = -(-n // bs)
    for epoch in range(pos["epoch"], task.local_epochs):
        order = shuffle(epoch).permutation(n)
        for b in range(pos["batch"] if epoch == pos["epoch"] else 0, count):
            yield order[b * bs : (b + 1) * bs], ((epoch, b + 1) if b + 1 < count else (epoch + 1, 0))


def frozen_features(engine: Engine, images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The frozen part's outputs for every image, FEATURE_BATCH at a time, filled into one
    array: the phone holds them once, never a list of batches beside their concatenation."""
    h = None
    for i in range(0, len(images), FEATURE_BATCH):
        out = engine.features(prepare(images[i : i + FEATURE_BATCH], spec))
        if h is None:
            h = np.empty((len(images), *out.shape[1:]), dtype=np.float32)
        h[i : i + len(out)] = out
    return h


def open_fed_part(bundle: Bundle) -> FedPart | None:
    """The bundle's fed part (``fed.onnx``: frozen blocks other phones of the run train), or None."""
    if not bundle.has(FED):
        return None
    from device_runtime.engines.inference import FedPart  # inference on ONNX Runtime, whichever engine trains

    return FedPart(bundle.path(FED))


def start_from(
    bundle: Bundle, fed_part: FedPart | None, task: Task, global_weights: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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


def round_key(task: Task, base_weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """What a checkpointed round belongs to: one task and one set of base weights."""
    return {"task": task.to_dict(), "base_digest": weights_digest(base_weights)}


def encode_checkpointed(
    checkpoint: RoundCheckpoint,
    device_id: str,
    task: Task,
    num_samples: int,
    update: dict[str, np.ndarray],
    error_feedback: ErrorFeedback,
    rng: np.random.Generator,
    **extra,
) -> EncodedUpdate:
    """A trained round's update encoded with feedback and checkpointed (phase "encoded", with
    ``extra``) before it is returned; for a round already encoded, the same bytes and key again."""
    st = checkpoint.state
    if st.get("round_key", {}).get("task") != task.to_dict() or st.get("phase") not in ("trained", "encoded"):
        raise InternalError(f"encode_update(round {task.round}) called before run_round finished that task")
    if st["phase"] == "encoded":
        return EncodedUpdate(task.round, st["payload"], st["idempotency_key"])
    payload, key = encode_with_feedback(device_id, task, num_samples, update, error_feedback, rng)
    checkpoint.save(
        st["round_key"], "encoded", st["weights"], {}, st["position"], error_feedback.state_dict(),  # momentum matters mid-round only
        metrics=st["metrics"], payload=payload, idempotency_key=key, **extra,
    )  # fmt: skip
    return EncodedUpdate(task.round, payload, key)


def encode_with_feedback(
    device_id: str,
    task: Task,
    num_samples: int,
    update: dict[str, np.ndarray],
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
                    f"data shard {path} lacks {' and '.join(missing)}: a shard holds 'images' and 'labels'; re-create it"
                )
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"data shard {path} is corrupt or not an .npz ({exc}); re-create it") from exc
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or len(labels) == 0:
        raise DataError(
            f"data shard {path} holds images {images.dtype}{images.shape} and labels {labels.dtype}{labels.shape}; "
            "want uint8 (N, H, W) images and N labels, N ≥ 1: re-create it"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"data shard {path} has labels outside 0..{num_classes - 1}: re-create it for this model")
    return images, labels.astype(np.int64)


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """sha256 over names, shapes and float32 bytes: identifies a set of base weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(f"{name}{w.shape}".encode())
        h.update(w.tobytes())
    return h.hexdigest()
