"""The one record every benchmark writes, and how it reports: one JSON line on stdout and the
same line in ``benchmarks/results/NAME.json`` (committed with the change that moved it).

A record says which benchmark it is, which schema it follows, the commit and the machine it
ran on, its config (the workload parameters) and its figures (what it measured)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

# 1 was the unversioned layouts before this one ("benchmark"/"results" beside "name"/"figures"),
# so a record without the field is of schema 1.
SCHEMA_VERSION: Final = 2
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
UNKNOWN = "unknown"


class Machine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    cpu: str
    cores: int | None  # os.cpu_count() cannot always tell
    arch: str  # "unknown" in a record from before the machine carried it
    python: str
    load_average_1m: float  # these machines are shared, so timings are noisy


class BenchmarkRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str  # the script's name, and its results file's
    schema_version: Literal[2]  # SCHEMA_VERSION: a Literal takes no constant's name
    commit: str = Field(pattern=r"^([0-9a-f]{40}|unknown)$")  # HEAD when it ran
    dirty: bool  # tracked files differed from that commit: the code that ran is in no commit
    machine: Machine
    config: dict[str, Any]
    figures: dict[str, Any]

    def to_json(self) -> str:
        # json.dumps, not model_dump_json: floats keep Python's repr, as the figures always had
        return json.dumps(self.model_dump())

    def write(self, path: Path | str) -> Path:
        """Writes ``to_json()`` (one line) to ``path`` whole: a crash leaves the old file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path | str) -> BenchmarkRecord:
        return cls.model_validate_json(Path(path).read_text())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine, and how busy it was."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


# B1's data and split (BENCHMARKS.md) as simulation config keys: the benchmarks built on B1's
# workload (B6, …) take it from here, so "the same data and split" stays true.
B1_DATA: Final = {"train_images": 60000, "test_images": 10000, "partition": "dirichlet", "alpha": 0.5, "seed": 0}


def library_versions() -> dict[str, str]:
    """fedkit's and the phone runtime's libraries' versions, for a record's config."""
    import numpy
    import onnxruntime

    from toolkit import __version__

    return {
        "fedkit": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def commit(repo: Path = REPO) -> tuple[str, bool]:
    """The checkout's HEAD and whether its tracked files have uncommitted changes; ("unknown",
    False) outside a git checkout, or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN, False
    return head.stdout.strip(), bool(status.stdout.strip())


def benchmark_record(name: str, config: dict, figures: dict) -> BenchmarkRecord:
    """The record of a run that just ended, on this commit and this machine."""
    head, dirty = commit()
    return BenchmarkRecord(
        name=name,
        schema_version=SCHEMA_VERSION,
        commit=head,
        dirty=dirty,
        machine=Machine(**machine()),
        config=config,
        figures=figures,
    )


def write_result(name: str, config: dict, figures: dict, folder: Path = RESULTS) -> BenchmarkRecord:
    """How every benchmark reports: its record as one JSON line on stdout and in ``folder/NAME.json``."""
    record = benchmark_record(name, config, figures)
    print(record.to_json())
    record.write(folder / f"{name}.json")
    return record
