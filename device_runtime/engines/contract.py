"""What every engine does (``Engine``) and the weight check they share. Apart from
``open_engine`` so the engines import it without importing the package that picks them."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from device_runtime.errors import EngineError


class Engine(Protocol):
    name: str

    def features(self, x: np.ndarray) -> np.ndarray:
        """The frozen blocks on prepared inputs (float32 NCHW); identity when nothing is frozen."""

    def forward(self, h: np.ndarray) -> np.ndarray:
        """The trainable blocks on features, inference mode: logits, activations at a SplitFed
        cut, or every held exit's logits (batch, exits, classes) for an early-exit bundle."""

    def gradients(self, h: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy loss of a batch and its gradient for every trainable parameter; for an
        early-exit bundle, the plan's weighted sum of every held exit's mean cross-entropy."""

    def backward_from(self, h: np.ndarray, grad_out: np.ndarray) -> dict[str, np.ndarray]:
        """SplitFed: parameter gradients given the gradient of the loss at the cut (from the edge)."""

    def get_weights(self) -> dict[str, np.ndarray]:
        """The trainable parameters, by name."""

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replaces the trainable parameters (all of them, by name)."""


def check_weights(weights: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    """``Engine.set_weights``' check: exactly the bundle's trainable tensors, at their shapes."""
    if set(weights) != set(shapes):
        missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
        raise EngineError(
            f"set_weights needs exactly the bundle's trainable tensors: missing {missing[:5]}, unknown {extra[:5]}"
        )
    for name, value in weights.items():
        if tuple(np.shape(value)) != shapes[name]:
            raise EngineError(f"weight {name!r} has shape {tuple(np.shape(value))}, the bundle says {shapes[name]}")
