"""The bundle manifest and the per-phone plan: the contract between exporter, phone and edge.

Plain frozen dataclasses (the phone installs no pydantic); ``from_dict`` validates and raises
BundleError naming the field, so a bad manifest never surfaces as a KeyError.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from device_runtime.errors import BundleError
from device_runtime.preprocess import InputSpec

SCHEMA_VERSION = 1
# ort: ONNX Runtime training (x86-64); executorch: the .pte programs (a native app; on a host with
# torch); numpy: a linear head in numpy, the frozen part on ONNX Runtime inference (any platform)
ENGINES = ("ort", "executorch", "numpy")


@dataclass(frozen=True)
class DevicePlan:
    """What one phone does. Blocks ``[0, cut)`` run on the phone, ``[train_from, cut)`` of them
    train there; the edge runs ``[cut, n)``. ``cut == n`` is federated transfer learning,
    ``cut < n`` is SplitFed.

    An early-exit plan (``exits`` not empty; a model with exits, ``toolkit.models.exits``) stops
    at its last exit, ``cut``: the phone holds blocks ``[0, cut)`` and the branches at ``exits``,
    nothing runs past it, and it trains blocks ``[train_from, cut)`` and every branch it holds
    with the multi-exit loss ``sum_i exit_weights[i] * CE(exit i)``."""

    cut: int
    train_from: int
    engine: str = "ort"
    encoding: str = "int8"  # update encoding, or "layered:<avg bits>" for per-layer bits
    local_epochs: int = 1
    batch_size: int = 32
    predicted: dict[str, float] = field(default_factory=dict)  # seconds: compute, upload, download, edge, total
    exits: tuple[int, ...] = ()  # positions of the exits the phone holds, the last one at cut
    exit_weights: tuple[float, ...] = ()  # the loss weight of each of them

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise BundleError(f"plan engine {self.engine!r} is unknown: use one of {', '.join(ENGINES)}")
        if not 0 <= self.train_from <= self.cut:
            raise BundleError(f"plan has train_from={self.train_from} outside 0..cut={self.cut}")
        # JSON gives lists: the plan compares equal to the one it was written from
        object.__setattr__(self, "exits", tuple(self.exits))
        object.__setattr__(self, "exit_weights", tuple(self.exit_weights))
        if self.exits and (
            list(self.exits) != sorted(set(self.exits)) or self.exits[-1] != self.cut or self.exits[0] < 1
        ):
            raise BundleError(
                f"plan exits {list(self.exits)} must be increasing positions from 1, the last at cut={self.cut}"
            )
        if len(self.exit_weights) != len(self.exits) or not all(
            isinstance(w, (int, float)) and w >= 0 for w in self.exit_weights
        ):
            raise BundleError(
                f"plan has exit weights {list(self.exit_weights)} for exits {list(self.exits)}: "
                "give one weight >= 0 per exit"
            )
        if self.exits and sum(self.exit_weights) <= 0:
            raise BundleError("plan exit weights are all 0: at least one exit must carry the loss")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevicePlan:
        return _build(cls, d, "plan")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        spec = _build(cls, d, "trainable tensor")
        return cls(spec.name, tuple(int(s) for s in spec.shape), spec.dtype)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle folder
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        return _build(cls, d, "file entry")


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a bundle. ``files`` maps a role (e.g. ``"ort.training_model"``) to a file."""

    model_id: str
    model_hash: str
    block_names: tuple[str, ...]
    plan: DevicePlan
    input_spec: InputSpec
    label_names: tuple[str, ...]
    trainable: tuple[TensorSpec, ...]
    files: dict[str, FileEntry]
    fedkit_version: str
    schema_version: int = SCHEMA_VERSION

    @property
    def engines(self) -> tuple[str, ...]:
        """The engines with files in the bundle, and numpy when what it trains is one linear layer
        (it needs no files of its own) and no early exits (a lone linear branch is not a head)."""
        with_files = tuple(e for e in ENGINES if any(role.startswith(e + ".") for role in self.files))
        numpy = not self.has_exits and linear_layer(self.trainable, self.is_splitfed) is not None
        return with_files + (("numpy",) if numpy else ())

    @property
    def is_splitfed(self) -> bool:
        return self.plan.cut < len(self.block_names) and not self.plan.exits

    @property
    def has_exits(self) -> bool:
        return bool(self.plan.exits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "fedkit_version": self.fedkit_version,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "block_names": list(self.block_names),
            "plan": self.plan.to_dict(),
            "input_spec": self.input_spec.to_dict(),
            "label_names": list(self.label_names),
            "trainable": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.trainable],
            "files": {role: asdict(f) for role, f in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError("manifest.json must hold a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest.json has schema version {version!r}, this runtime reads {SCHEMA_VERSION}: "
                "re-export the bundle with this fedkit version or update the runtime"
            )
        try:
            return cls(
                model_id=str(d["model_id"]),
                model_hash=str(d["model_hash"]),
                block_names=tuple(d["block_names"]),
                plan=DevicePlan.from_dict(d["plan"]),
                input_spec=InputSpec.from_dict(d["input_spec"]),
                label_names=tuple(d["label_names"]),
                trainable=tuple(TensorSpec.from_dict(t) for t in d["trainable"]),
                files={role: FileEntry.from_dict(f) for role, f in d["files"].items()},
                fedkit_version=str(d["fedkit_version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(
                f"manifest.json is malformed ({type(exc).__name__}: {exc}): re-export the bundle"
            ) from exc


def linear_layer(trainable: Iterable[TensorSpec], splitfed: bool) -> str | None:
    """The name of the one linear layer a part trains (``X`` of ``X.weight`` (out, in) and
    ``X.bias`` (out,)), or None when it trains anything else or is SplitFed: what the numpy
    engine can train."""
    shapes = {t.name: tuple(t.shape) for t in trainable}
    layers = {name.rsplit(".", 1)[0] for name in shapes}
    if splitfed or len(layers) != 1:
        return None
    (layer,) = layers
    if set(shapes) != {f"{layer}.weight", f"{layer}.bias"}:
        return None
    weight, bias = shapes[f"{layer}.weight"], shapes[f"{layer}.bias"]
    if len(weight) != 2 or bias != (weight[0],):
        return None
    return layer


_T = TypeVar("_T")


def _build(cls: type[_T], d: Any, what: str) -> _T:
    if not isinstance(d, dict):
        raise BundleError(f"manifest {what} must be a JSON object, got {type(d).__name__}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise BundleError(f"manifest {what} is malformed: {exc}") from exc
