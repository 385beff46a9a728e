"""The global model's accuracy on Fashion-MNIST's test images, on this host: what `fedkit
simulate` records after every round and `fedkit export-global` prints. The frozen part's
features are computed once (cached on disk, ``toolkit.central.features``); the trainable part
runs in PyTorch with the run's tensors merged in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from toolkit.models import SplittableModel


class Evaluator:
    def __init__(self, model: SplittableModel, stop_block: int, test_images: int = 10000):
        import torch

        from toolkit.central import features
        from toolkit.data import load_fashion_mnist

        test = load_fashion_mnist("test")
        self.labels = torch.from_numpy(test.labels[:test_images].astype(np.int64))
        self.h = torch.from_numpy(features(model, test.images[:test_images], stop_block))
        self.part = model.part(stop_block, len(model.block_names)).eval()

    def accuracy(self, tensors: dict[str, np.ndarray]) -> float:
        import torch

        state = self.part.state_dict()
        state.update({k: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k in state})
        self.part.load_state_dict(state)
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(self.labels), 1000):
                correct += int((self.part(self.h[i : i + 1000]).argmax(1) == self.labels[i : i + 1000]).sum())
        return correct / len(self.labels)
