"""What a simulated run leaves for `fedkit simulate`'s last line, the report and the benchmarks:
``summary.json``, a typed record with a schema version; an exit model's ``exit_logits.npz`` (the
final global model's test logits at every exit, for the early-exit curve); and the live
display's ``Tick``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from toolkit.aggregator.status import BestExitModel
from toolkit.errors import FedkitError

SCHEMA_VERSION = 2
SUMMARY = "summary.json"
EXIT_LOGITS = "exit_logits.npz"


@dataclass
class Tick:
    """What the live display shows, refreshed every poll."""

    elapsed_s: float
    stage: str | None
    round: int | None
    reports: int
    assigned: int
    accuracy: float | None
    versions: int
    bytes_up: int
    phones_running: int
    faults: list[str] = field(default_factory=list)
    done: bool = False


class PhoneSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str
    phone_class: str  # the profile (catalogue class) it was planned as
    compute_factor: float  # its round takes this many times what this host took
    address_space_mb: int | None  # RLIMIT_AS; None: no cap
    link: str  # how its link was shaped
    bundles: list[str]  # bundle folders, the planned one first
    samples: int
    starts: int
    exit_code: int | None
    offline_windows: int
    peak_rss_mb: float | None
    # the plan's prediction (seconds and bytes per round) beside what the aggregator measured
    predicted: dict[str, float]
    measured_round_s: float | None
    measured_up_bytes: float | None  # per round
    measured_down_bytes: float | None  # per round


class Reference(BaseModel):
    final_accuracy: float
    test_accuracy: list[float]
    source: str


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    model: str
    mode: str
    depth: str
    test_images: int
    edge: str  # the edge profile the planner priced SplitFed against, and where it came from
    phones: list[PhoneSummary]
    compute_note: str
    setup_s: float
    train_s: float
    wall_s: float
    netem: bool
    reference: Reference | None
    rounds: int
    final_accuracy: float | None
    updates_accepted: int
    bytes_accepted: int
    accepted_told_phones: int
    accepted_lost: int
    faults: list[dict]
    crashed_phones: dict[str, int]
    splitfed: dict | None = None  # the edge's status (GET /v1/splitfed/status) at the end
    best_exit: BestExitModel | None = None  # an exit model's best exit-point version (GET /v1/status)
    report: str | None = None  # index.html, once written

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / SUMMARY).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> RunSummary:
        path = Path(run_dir) / SUMMARY
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FedkitError(f"{run_dir} holds no {SUMMARY}: it is not a finished fedkit simulate run folder") from exc
        if data.get("schema_version") != SCHEMA_VERSION:
            raise FedkitError(
                f"{path} has schema version {data.get('schema_version')!r}, this fedkit reads "
                f"{SCHEMA_VERSION}: run the simulation again with this fedkit"
            )
        return cls.model_validate(data)


@dataclass(frozen=True)
class ExitLogits:
    """An exit model's global version on the test images: every exit's logits, what inference
    up to each exit costs, and the labels; ``exit_logits.npz`` in the run folder."""

    version: int
    positions: np.ndarray  # (exits,) int64
    flops: np.ndarray  # (exits,) int64: an image leaving there, forward (ExitStats.flops)
    alone_flops: int  # the final exit alone, no branch run: the plain model's forward
    logits: np.ndarray  # (images, exits, classes) float32
    labels: np.ndarray  # (images,) int64

    def save(self, run_dir: Path) -> None:
        np.savez(
            Path(run_dir) / EXIT_LOGITS,
            version=self.version,
            positions=self.positions,
            flops=self.flops,
            alone_flops=self.alone_flops,
            logits=self.logits,
            labels=self.labels,
        )

    @classmethod
    def load(cls, run_dir: Path) -> ExitLogits | None:
        """The run folder's, or None when it has none (not an exit model's run)."""
        path = Path(run_dir) / EXIT_LOGITS
        if not path.is_file():
            return None
        with np.load(path) as data:
            return cls(
                version=int(data["version"]),
                positions=data["positions"],
                flops=data["flops"],
                alone_flops=int(data["alone_flops"]),
                logits=data["logits"],
                labels=data["labels"],
            )


def central_reference(model: str) -> Reference | None:
    """The centralized reference (benchmarks/results/central.json of this checkout), if it is
    there and was trained for this model."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "central.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("config", {}).get("model", model) != model:
        return None
    return Reference(
        final_accuracy=data["figures"]["final_accuracy"],
        test_accuracy=data["figures"]["test_accuracy"],
        source="benchmarks/results/central.json",
    )
