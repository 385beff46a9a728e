"""A validation probe on the phone: the accuracy of an inference model (ONNX, images → logits)
on the phone's held-out slice, of which only two counts leave the phone.

The held-out slice is the trainer's (``device_runtime.trainer.holdout_index``), the images are
prepared as for training (``device_runtime.preprocess.prepare``) and the model runs on ONNX
Runtime's inference build, a few images at a time. numpy and ONNX Runtime only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime.engines.inference import float32, inference_options, load_onnxruntime, run
from device_runtime.errors import EngineError
from device_runtime.local_round import load_shard
from device_runtime.preprocess import InputSpec, prepare
from device_runtime.trainer import HOLDOUT_FRACTION, holdout_index

BATCH = 64  # images per run: at 32×32 a MobileNetV2's activations for 64 images are a few MB


@dataclass(frozen=True)
class ProbeCounts:
    correct: int
    total: int  # held-out images the model ran on
    samples: int  # the shard's images

    def to_json(self) -> dict[str, int]:
        return {"correct": self.correct, "total": self.total, "samples": self.samples}


def check_probe_bytes(probe: str, blob: bytes) -> None:
    """The downloaded model is the probe's file: its sha256 is the probe's id."""
    digest = hashlib.sha256(blob).hexdigest()
    if digest != probe:
        raise EngineError(f"probe {probe}: the downloaded model's sha256 is {digest}; download it again")


def evaluate_probe(
    blob: bytes, spec: InputSpec, shard_path: str | Path, holdout_fraction: float = HOLDOUT_FRACTION
) -> ProbeCounts:
    """Runs the model ``blob`` on the held-out slice of the shard and counts its right answers."""
    ort = load_onnxruntime()
    try:
        session = ort.InferenceSession(blob, inference_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own error classes and more: any of them means the same here
        raise EngineError(f"ONNX Runtime cannot load the probe's model ({exc})") from exc
    classes = session.get_outputs()[0].shape[-1]
    if not isinstance(classes, int):
        raise EngineError("the probe's model has no fixed number of classes")
    name = session.get_inputs()[0].name
    images, labels = load_shard(shard_path, classes)
    held = holdout_index(len(labels), holdout_fraction)

    def logits(x: np.ndarray) -> np.ndarray:
        return run("the probe's model", lambda: session.run(None, {name: float32(x)})[0])

    correct = 0
    for i in range(0, len(held), BATCH):
        idx = held[i : i + BATCH]
        correct += int((logits(prepare(images[idx], spec)).argmax(axis=1) == labels[idx]).sum())
    return ProbeCounts(correct, len(held), len(labels))
