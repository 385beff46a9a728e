"""The global model's accuracy on Fashion-MNIST's test images, on this host: what `fedkit
simulate` records after every round and `fedkit export-global` prints. The frozen part's
features are computed once (cached on disk, ``toolkit.central.features``); the trainable part
runs in PyTorch with the run's tensors merged in.

An exit model (``toolkit.models.exits``) is evaluated at every exit at once: ``exit_metrics``
gives each exit's accuracy and mean cross-entropy and the weighted total loss
L = Σᵢ λᵢ · CE(zᵢ, y), the loss the phones train with; ``accuracy`` is its final exit's, so
consumers of one number read the whole model's, as for any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from toolkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from toolkit.models import SplittableModel

BATCH = 1000  # test images per forward: bounds memory, not the result


def frozen_end(model: SplittableModel, tensors: dict[str, np.ndarray]) -> int:
    """The ``stop_block`` for a run's ``tensors`` (its version 0's): the first block they hold a
    parameter of (the last block when they hold none); the blocks before it are never trained,
    so they run as the zoo has them."""
    trained = [i for i, block in enumerate(model.block_names) if any(n.startswith(block + ".") for n in tensors)]
    return min(trained, default=len(model.block_names) - 1)


@dataclass(frozen=True)
class ExitMetrics:
    """An exit model's figures on the test images, by exit position (the final exit included)."""

    accuracy: dict[int, float]
    loss: dict[int, float]  # mean cross-entropy
    total_loss: float  # Σ weight · loss over the exits
    logits: np.ndarray | None = None  # (images, exits, classes) float32, when asked for
    labels: np.ndarray | None = None  # (images,), with the logits

    @property
    def mean_accuracy(self) -> float:
        """The exit-point model's accuracy: the mean over its exits."""
        return sum(self.accuracy.values()) / len(self.accuracy)


class Evaluator:
    """``stop_block``: the frozen part's end (the run's smallest train_from). ``exit_weights``: an
    exit model's λ, one per exit in position order (default 1 each, the plans' default)."""

    def __init__(
        self,
        model: SplittableModel,
        stop_block: int,
        test_images: int = 10000,
        exit_weights: Sequence[float] | None = None,
    ):
        import torch

        from toolkit.central import features
        from toolkit.data import load_fashion_mnist

        test = load_fashion_mnist("test")
        self.labels = torch.from_numpy(test.labels[:test_images].astype(np.int64))
        self.h = torch.from_numpy(features(model, test.images[:test_images], stop_block))
        self.part = model.trainable_part(stop_block, len(model.block_names)).eval()
        self.model = model
        self.exits = model.exits  # () for a model without exits
        self.exit_weights = (1.0,) * len(self.exits) if exit_weights is None else tuple(exit_weights)
        if len(self.exit_weights) != len(self.exits):
            raise ConfigError(
                f"{len(self.exit_weights)} exit weights for {len(self.exits)} exits at {list(self.exits)} of "
                f"{model.model_id}: give one per exit"
            )

    def _logits(self, tensors: dict[str, np.ndarray]) -> torch.Tensor:
        """The part's outputs on every test image with ``tensors`` merged in: (images, classes),
        or (images, exits, classes) for an exit model."""
        import torch

        state = self.part.state_dict()
        state.update({k: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k in state})
        self.part.load_state_dict(state)
        with torch.inference_mode():
            return torch.cat([self.part(self.h[i : i + BATCH]) for i in range(0, len(self.labels), BATCH)])

    def accuracy(self, tensors: dict[str, np.ndarray]) -> float:
        """The model's test accuracy (an exit model's: its final exit's)."""
        logits = self._logits(tensors)
        final = logits[:, -1] if self.exits else logits
        return float((final.argmax(-1) == self.labels).double().mean())

    def exit_metrics(self, tensors: dict[str, np.ndarray], *, logits: bool = False) -> ExitMetrics:
        """Every exit's accuracy and mean cross-entropy, and their sum weighted by the exit
        weights. ``logits``: keep the stacked test logits and labels too (the early-exit curve's)."""
        import torch.nn.functional as F

        if not self.exits:
            raise ConfigError(
                f"{self.model.model_id} has no exits: exit metrics need NAME+exits (e.g. small_cnn+exits:1,2)"
            )
        z = self._logits(tensors)
        accuracy, loss = {}, {}
        for i, position in enumerate(self.exits):
            accuracy[position] = float((z[:, i].argmax(-1) == self.labels).double().mean())
            loss[position] = float(F.cross_entropy(z[:, i], self.labels))
        return ExitMetrics(
            accuracy=accuracy,
            loss=loss,
            total_loss=sum(w * loss[p] for w, p in zip(self.exit_weights, self.exits, strict=True)),
            logits=z.numpy().astype(np.float32) if logits else None,
            labels=self.labels.numpy() if logits else None,
        )
