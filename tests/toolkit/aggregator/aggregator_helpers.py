"""Helpers for the aggregator tests: a tiny run (three trainable tensors), a fake clock,
enrolling phones and building their pushes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_runtime.codec import UpdateHeader, encode
from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.config import parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.store import Store

SHAPES = {"features.2.weight": (4, 3), "classifier.weight": (10, 8), "classifier.bias": (10,)}


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def initial_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def write_weights(folder: Path) -> Path:
    path = folder / "weights.bin"
    path.write_bytes(encode(UpdateHeader("init", 0, 0, 1, kind="weights"), initial_weights(), "fp32"))
    return path


def run_config(folder: Path, **overrides) -> dict:
    write_weights(folder)
    config = {"name": "test", "weights": "weights.bin", "stages": [{"name": "head", "rounds": 3, "lr": 0.01}]}
    config.update(overrides)
    return config


def make_coordinator(folder: Path, clock: Clock | None = None, **overrides) -> Coordinator:
    config = parse_config(run_config(folder, **overrides), folder)
    coordinator = Coordinator(config, Store(config.default_db()), clock or Clock())
    coordinator.start()
    return coordinator


def enrol(coordinator: Coordinator, device_id: str) -> str:
    (token,) = issue_tokens(coordinator.store, 1)
    enrolment = coordinator.enrol(token, device_id)
    assert enrolment.status == "enrolled", enrolment
    return enrolment.credential


def delta(value: float, names=tuple(SHAPES)) -> dict[str, np.ndarray]:
    return {name: np.full(SHAPES[name], value, np.float32) for name in names}


def payload(
    device_id: str, round_: int, base_version: int, tensors: dict, num_samples: int = 10, encoding: str = "fp32"
) -> bytes:
    return encode(UpdateHeader(device_id, round_, base_version, num_samples), tensors, encoding)
