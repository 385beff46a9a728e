"""Early-exit inference on the phone: an image leaves the model at the first exit confident
enough, so the phone computes only up to where it stops. numpy and ONNX Runtime inference only.

**The folder** (written by ``exporters.early_exit``): ``early_exit.json`` (the index: the model,
its exits, each segment's file with size and sha256, FLOPs per exit, label names, input spec)
and one ONNX file per exit. Segment ``k`` runs blocks ``[p_{k-1}, p_k)`` (``p_0 = 0``; ``p_k``
the position of exit ``k``) on the activation at ``p_{k-1}`` and returns one flat row per image:
the logits of exit ``k``, then the activation at ``p_k`` flattened, which segment ``k + 1``
reads. The last segment returns the logits alone. (One output per segment keeps the exporter's
single-output ONNX form; splitting the row is a slice and a reshape.)

**The stopping rule** (``leaves``), the one the predictor and ``early_exit_curve`` both apply:
with ``criterion="max_softmax"`` an image leaves at an exit when its largest softmax
probability is ``>= threshold``; with ``"entropy"`` when the entropy of its softmax, in nats,
is ``<= threshold``. The last exit takes every image still in flight. Only those in flight run
the next segment.

**Cost per image.** An image that leaves at exit ``p`` ran blocks ``[0, p)`` and the branch of
every exit up to ``p``: the exit's ``flops`` in the index. An exit's ``alone_flops`` leaves out
the branches before it; for the final exit that is the plain model's forward, the "final exit
alone" baseline an early-exit curve is measured against.

**Default thresholds** (``DEFAULT_THRESHOLDS``), from the cheapest (most images leave early) to
the dearest: max softmax 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999; entropy
1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001 nats (10 classes: at most ln 10 = 2.30).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from device_runtime.bundle import sha256_file
from device_runtime.engines.inference import float32, inference_options, load_session, run
from device_runtime.errors import BundleError
from device_runtime.manifest import FileEntry
from device_runtime.preprocess import InputSpec, prepare

INDEX = "early_exit.json"
SCHEMA_VERSION = 1
Criterion = Literal["max_softmax", "entropy"]
CRITERIA: tuple[Criterion, ...] = ("max_softmax", "entropy")
DEFAULT_THRESHOLDS: dict[Criterion, tuple[float, ...]] = {
    "max_softmax": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
    "entropy": (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001),
}
BATCH = 256  # images per ONNX Runtime call: MobileNetV2's widest activation at 32×32 stays ~8 MB


@dataclass(frozen=True)
class Segment:
    """The part of the model that ends at one exit."""

    exit: int  # the exit's position: after block exit - 1
    input_shape: tuple[int, ...]  # what it reads per image: the image, or the activation at the previous exit
    file: FileEntry
    flops: int  # an image leaving here: blocks [0, exit) and every branch up to this one, forward
    alone_flops: int  # blocks [0, exit) and this exit's branch only

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, d: Any) -> Segment:
        if not isinstance(d, dict):
            raise BundleError(f"{INDEX}: a segment must be a JSON object, got {type(d).__name__}")
        segment = cls(
            exit=d["exit"],
            input_shape=tuple(d["input_shape"]),
            file=FileEntry.from_dict(d["file"]),
            flops=d["flops"],
            alone_flops=d["alone_flops"],
        )
        numbers = (segment.exit, *segment.input_shape, segment.flops, segment.alone_flops, segment.file.size)
        texts = (segment.file.path, segment.file.sha256)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers) or not all(
            isinstance(t, str) for t in texts
        ):
            raise BundleError(f"{INDEX}: segment {d!r} needs integers and strings where it has others")
        return segment


@dataclass(frozen=True)
class EarlyExitIndex:
    """``early_exit.json``: what the predictor needs to verify and run the segments."""

    model_id: str
    model_hash: str
    input_spec: InputSpec
    label_names: tuple[str, ...]
    segments: tuple[Segment, ...]
    fedkit_version: str
    schema_version: int = SCHEMA_VERSION

    @property
    def exits(self) -> tuple[int, ...]:
        return tuple(s.exit for s in self.segments)

    @property
    def flops(self) -> npt.NDArray[np.int64]:
        """Per exit: what an image leaving there cost."""
        return np.array([s.flops for s in self.segments], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "fedkit_version": self.fedkit_version,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "input_spec": self.input_spec.to_dict(),
            "label_names": list(self.label_names),
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: Any) -> EarlyExitIndex:
        if not isinstance(d, dict):
            raise BundleError(f"{INDEX} must hold a JSON object")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise BundleError(
                f"{INDEX} has schema version {d.get('schema_version')!r}, this runtime reads {SCHEMA_VERSION}: "
                "re-export the early-exit folder with this fedkit version"
            )
        try:
            index = cls(
                model_id=str(d["model_id"]),
                model_hash=str(d["model_hash"]),
                input_spec=InputSpec.from_dict(d["input_spec"]),
                label_names=tuple(str(n) for n in d["label_names"]),
                segments=tuple(Segment.from_dict(s) for s in d["segments"]),
                fedkit_version=str(d["fedkit_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{INDEX} is malformed ({type(exc).__name__}: {exc}): re-export the early-exit folder"
            ) from exc
        if not index.segments or list(index.exits) != sorted(set(index.exits)) or index.exits[0] < 1:
            raise BundleError(f"{INDEX}: exits {list(index.exits)} must be increasing positions from 1")
        return index

    @classmethod
    def load(cls, folder: str | Path) -> EarlyExitIndex:
        """The index of ``folder``, after every segment file's size and sha256 are checked."""
        folder = Path(folder)
        path = folder / INDEX
        if not path.is_file():
            raise BundleError(
                f"{path} is missing: this folder is not an early-exit export (fedkit export-global --early-exit)"
            )
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc}); re-export the early-exit folder") from exc
        index = cls.from_dict(data)
        for segment in index.segments:
            _verify(folder, segment)
        return index


@dataclass(frozen=True)
class Prediction:
    """What ``EarlyExitPredictor.predict`` found for N images."""

    labels: npt.NDArray[np.int64]  # (N,) the predicted class
    exit_index: npt.NDArray[np.int64]  # (N,) which exit each image left at: an index into ``exits``
    flops: npt.NDArray[np.int64]  # (N,) the forward FLOPs each image cost
    exits: tuple[int, ...]  # the exits' positions
    ran: tuple[int, ...]  # images each segment ran: those still in flight when it was reached

    @property
    def mean_mflops(self) -> float:
        return float(self.flops.mean()) / 1e6 if len(self.flops) else 0.0


@dataclass(frozen=True)
class CurvePoint:
    """Early-exit inference at one threshold, over a set of labelled images."""

    threshold: float | None  # None: the final exit alone (no branch runs)
    accuracy: float
    mean_mflops: float  # forward MFLOPs per image
    exit_shares: tuple[float, ...]  # the share of the images leaving at each exit


class EarlyExitPredictor:
    """An early-exit folder, verified when opened; each segment's ONNX Runtime session is loaded
    the first time an image reaches it."""

    def __init__(self, folder: str | Path) -> None:
        self.root = Path(folder)
        self.index = EarlyExitIndex.load(self.root)
        self._sessions: dict[int, Any] = {}  # Any: onnxruntime ships no types

    @property
    def num_classes(self) -> int:
        return len(self.index.label_names)

    def prepare(self, images: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """uint8 images (N, H, W[, C]) → the model's input; float32 (N, C, H, W) at the input size as is."""
        x = np.asarray(images)
        spec = self.index.input_spec
        if x.dtype == np.uint8:
            return prepare(x, spec)
        if x.dtype == np.float32 and x.shape[1:] == (spec.channels, spec.height, spec.width):
            return float32(x)
        raise ValueError(
            f"images must be uint8 (N, H, W[, C]) or prepared float32 (N, {spec.channels}, {spec.height}, "
            f"{spec.width}), got {x.dtype} {x.shape}"
        )

    def predict(
        self, images: npt.ArrayLike, threshold: float, criterion: Criterion = "max_softmax", batch: int = BATCH
    ) -> Prediction:
        """Each image leaves at the first exit where ``leaves`` holds, the last exit taking the rest."""
        x = self.prepare(images)
        n, last = len(x), len(self.index.segments) - 1
        labels = np.zeros(n, dtype=np.int64)
        exit_index = np.zeros(n, dtype=np.int64)
        ran = [0] * len(self.index.segments)
        for start in range(0, n, batch):
            rows = np.arange(start, min(start + batch, n))
            h = x[rows]
            for k in range(last + 1):
                logits, h = self._run(k, h)
                ran[k] += len(rows)
                out = np.ones(len(rows), dtype=bool) if k == last else leaves(logits, threshold, criterion)
                labels[rows[out]] = logits[out].argmax(1)
                exit_index[rows[out]] = k
                rows, h = rows[~out], h[~out]
                if not len(rows):
                    break
        return Prediction(labels, exit_index, self.index.flops[exit_index], self.index.exits, tuple(ran))

    def logits(self, images: npt.ArrayLike, batch: int = BATCH) -> npt.NDArray[np.float32]:
        """Every exit's logits for every image, (N, exits, classes): what ``early_exit_curve`` reads."""
        x = self.prepare(images)
        out = np.zeros((len(x), len(self.index.segments), self.num_classes), dtype=np.float32)
        for start in range(0, len(x), batch):
            h = x[start : start + batch]
            for k in range(len(self.index.segments)):
                out[start : start + len(h), k], h = self._run(k, h)
        return out

    def _run(self, k: int, h: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        # → (the exit's logits, the activation the next segment reads; empty after the last)
        segment = self.index.segments[k]
        if k not in self._sessions:
            self._sessions[k] = load_session(self.root / segment.file.path, inference_options())
        session = self._sessions[k]
        row = run(f"segment {k} (exit {segment.exit})", lambda: session.run(None, {"input": float32(h)})[0])
        c = self.num_classes
        if k + 1 == len(self.index.segments):
            return row, row[:, c:]
        return row[:, :c], float32(row[:, c:]).reshape(-1, *self.index.segments[k + 1].input_shape)


def confidence(logits: npt.ArrayLike, criterion: Criterion) -> npt.NDArray[np.float64]:
    """(N, C) logits → (N,) the largest softmax probability, or the softmax's entropy in nats."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total: npt.NDArray[np.float64] = e.sum(axis=-1)
    if criterion == "max_softmax":
        return 1.0 / total  # the largest term of e is exp(0)
    if criterion == "entropy":
        p = e / total[..., None]
        entropy: npt.NDArray[np.float64] = np.log(total) - (p * z).sum(axis=-1)
        return entropy
    raise ValueError(f"criterion {criterion!r} is unknown: use one of {', '.join(CRITERIA)}")


def leaves(logits: npt.ArrayLike, threshold: float, criterion: Criterion) -> npt.NDArray[np.bool_]:
    """(N, C) logits of one exit → (N,) whether each image leaves there (see the module's doc)."""
    c = confidence(logits, criterion)
    return c >= threshold if criterion == "max_softmax" else c <= threshold


def exit_taken(logits: npt.ArrayLike, threshold: float, criterion: Criterion) -> npt.NDArray[np.int64]:
    """(N, exits, C) logits → (N,) the exit each image leaves at: the first where it ``leaves``, else the last."""
    z = np.asarray(logits)
    passes = np.stack([leaves(z[:, k], threshold, criterion) for k in range(z.shape[1])], axis=1)
    passes[:, -1] = True
    return np.asarray(passes.argmax(axis=1), dtype=np.int64)


def early_exit_curve(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    exit_flops: npt.ArrayLike,
    thresholds: tuple[float, ...] | None = None,
    criterion: Criterion = "max_softmax",
) -> list[CurvePoint]:
    """Accuracy and mean MFLOPs per image at each threshold (default ``DEFAULT_THRESHOLDS``), from
    every exit's logits (N, exits, C), the true labels (N,) and each exit's cumulative FLOPs."""
    z, y, flops = np.asarray(logits), np.asarray(labels), np.asarray(exit_flops, dtype=np.float64)
    if z.ndim != 3 or z.shape[:2] != (len(y), len(flops)):
        raise ValueError(
            f"logits {z.shape} must be (images, exits, classes) for {len(y)} labels and {len(flops)} exits"
        )
    points = []
    for t in DEFAULT_THRESHOLDS[criterion] if thresholds is None else thresholds:
        taken = exit_taken(z, t, criterion)
        predicted = z[np.arange(len(y)), taken].argmax(axis=1)
        points.append(
            CurvePoint(
                threshold=float(t),
                accuracy=float((predicted == y).mean()),
                mean_mflops=float(flops[taken].mean()) / 1e6,
                exit_shares=tuple(float(s) for s in np.bincount(taken, minlength=len(flops)) / len(y)),
            )
        )
    return points


def final_exit_alone(logits: npt.ArrayLike, labels: npt.ArrayLike, alone_flops: int) -> CurvePoint:
    """The baseline: every image through the last exit with no branch run, at ``alone_flops``
    (the last segment's, in the index: the plain model's forward for the model's final exit)."""
    z, y = np.asarray(logits), np.asarray(labels)
    shares = (0.0,) * (z.shape[1] - 1) + (1.0,)
    return CurvePoint(None, float((z[:, -1].argmax(axis=1) == y).mean()), alone_flops / 1e6, shares)


def _verify(folder: Path, segment: Segment) -> None:
    entry = segment.file
    path = (folder / entry.path).resolve()
    if folder.resolve() not in path.parents:
        raise BundleError(f"{folder / INDEX} names {entry.path!r}, outside the folder: refusing it")
    if not path.is_file():
        raise BundleError(f"{folder / entry.path} (exit {segment.exit}) is missing; re-export the early-exit folder")
    if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
        raise BundleError(
            f"{folder / entry.path} (exit {segment.exit}) does not match its size and sha256 in {INDEX}: "
            "the file is truncated or altered; re-export or copy the early-exit folder again"
        )
