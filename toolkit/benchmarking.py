"""What every benchmark records about the machine it ran on, and how it reports: one JSON line
on stdout and the same line in ``benchmarks/results/NAME.json`` (committed with the change
that moved it)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine, and how busy it was: these machines are shared, so timings are noisy."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def write_result(record: dict, path: Path) -> None:
    line = json.dumps(record)
    print(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n")
