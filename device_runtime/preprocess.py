"""Turns a phone's raw images into the model's input, with numpy only.

The phone stores its images as uint8 (small on disk); the model wants float32 NCHW at the
bundle's input size, bilinearly resized and normalised. The resize reproduces PyTorch's
``F.interpolate(mode="bilinear", align_corners=False)`` exactly (as two small matrix
products) so features computed on the phone equal those the host computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """The model's input: size, channels and per-channel normalisation (after scaling to [0, 1])."""

    height: int = 32
    width: int = 32
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            channels=int(d["channels"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


@lru_cache(maxsize=16)
def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) matrix of 1-D bilinear interpolation, half-pixel centres."""
    scale = size_in / size_out
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)  # PyTorch clamps negative source coordinates to 0
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m.astype(np.float32)


def prepare(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) → float32 (N, C, spec.height, spec.width)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    x = images.astype(np.float32) / 255.0
    _, h, w, c = x.shape
    if c == 1 and spec.channels != 1:
        x = np.repeat(x, spec.channels, axis=3)
    elif c != spec.channels:
        raise ValueError(f"images have {c} channels, the model wants {spec.channels}")
    x = x.transpose(0, 3, 1, 2)  # NCHW
    if (h, w) != (spec.height, spec.width):
        rh = resize_matrix(h, spec.height)
        rw = resize_matrix(w, spec.width)
        x = rh @ x @ rw.T  # broadcasts over (N, C): rows, then columns
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
