"""DeviceProfile: what one phone (or the edge) can do, measured or catalogued.

Every cost the planner predicts is scaled from these figures: ``gflops`` (effective fp32
dense-convolution throughput with ONNX Runtime, all cores) for compute, ``block_timings``
when the model's own blocks were timed on the device, ``memory_mb`` for what fits, ``link``
for transfers.

``engines`` are the engines the phone's runtime can train with, without torch: the planner
plans nothing else. fedkit's Python phone runtime (``device_runtime``) trains with ``ort``
only, so a measured profile (``local`` or ``adb``: the probe runs that Python) never lists
``executorch``, whose Python bindings import torch; a catalogue class lists what the runtime
it assumes can run (``catalog.json``, each class's ``runtime``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from toolkit.errors import PlanError

SCHEMA_VERSION: Final = 1  # Final: its type is Literal[1], as schema_version's
Source = Literal["local", "adb", "arm64-emulated", "catalog"]  # where a profile's figures come from
# Share of the memory available on a device that fedkit plans to use: the rest stays for the
# OS and the apps the owner is using, so training does not get the app killed.
MEMORY_SHARE = 0.5


class Link(BaseModel):
    """A network path between the phone and the aggregator."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "measured"
    uplink_mbps: PositiveFloat  # Mbit/s
    downlink_mbps: PositiveFloat  # Mbit/s
    rtt_ms: NonNegativeFloat
    radio_power_w: PositiveFloat | None = None  # W while the radio transfers; for energy budgets


class BlockTiming(BaseModel):
    """Forward latency of each block of one model, measured on the device with ONNX Runtime."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    batch: PositiveInt
    seconds: dict[str, NonNegativeFloat]  # block name -> seconds per forward of one batch


class DeviceProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    source: Source
    cpu_cores: PositiveInt
    gflops: PositiveFloat  # GFLOP/s, effective fp32 dense conv with ONNX Runtime
    kernel_gflops: dict[str, PositiveFloat] = {}  # measured per kernel: conv, pointwise, depthwise, matmul
    memory_mb: PositiveFloat  # MB fedkit may use: MEMORY_SHARE of what the device has available
    engines: tuple[Literal["ort", "executorch", "numpy"], ...] = ("ort",)  # what the phone trains with, torch-free
    link: Link | None = None
    cpu_power_w: PositiveFloat | None = None  # W with all cores busy; for energy budgets
    block_timings: tuple[BlockTiming, ...] = ()
    notes: str = ""

    @model_validator(mode="after")
    def _measured_engines_run_without_torch(self) -> DeviceProfile:
        # probe v1 listed executorch wherever its Python package was installed; a Python phone
        # cannot run it without torch, so such a profile would get plans the phone cannot run
        if self.source in ("local", "adb") and "executorch" in self.engines:
            raise ValueError(
                "a measured profile cannot list executorch: fedkit's Python phone runtime trains with ort only "
                "(ExecuTorch's Python bindings need torch); re-run `fedkit profile` with this fedkit"
            )
        return self

    def timing(self, model_id: str) -> BlockTiming | None:
        return next((t for t in self.block_timings if t.model_id == model_id), None)

    def with_link(self, link: Link) -> DeviceProfile:
        return self.model_copy(update={"link": link})

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DeviceProfile:
        return cls.parse(read_json(path, "profile", "fedkit profile"), str(path))

    @classmethod
    def parse(cls, data: object, where: str = "profile") -> DeviceProfile:
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise PlanError(
                f"{where} has schema version {data.get('schema_version')!r}, this fedkit reads "
                f"{SCHEMA_VERSION}: re-run `fedkit profile` with this version"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(root)"
            raise PlanError(
                f"{where} is invalid: {field}: {first['msg']} ({exc.error_count()} problem(s)); "
                "fix the file or re-run `fedkit profile`"
            ) from exc


def load_profiles(folder: Path) -> list[DeviceProfile]:
    """Every ``*.json`` profile in a folder, in name order."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise PlanError(f"{folder} holds no *.json profiles: run `fedkit profile --out {folder}/NAME.json` first")
    return [DeviceProfile.load(f) for f in files]


def read_json(path: Path, what: str, command: str) -> object:
    """The JSON in ``path`` (a ``what`` that ``command`` writes), or a PlanError saying to run it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise PlanError(f"{what} {path} does not exist: run `{command}` to make one") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{what} {path} is not readable JSON ({exc}): re-run `{command}`") from exc
