"""The model zoo: pretrained backbones as SplittableModels with a fresh head."""

from __future__ import annotations

import torch

from toolkit.errors import ModelError
from toolkit.models.exits import ExitModel, split_spec
from toolkit.models.mobilenet_v2 import MobileNetV2
from toolkit.models.small_cnn import SmallCNN
from toolkit.models.splittable import BlockStats, SplittableModel, SubModel
from toolkit.models.weights import MOBILENET_V2_SHA256, load_verified_state_dict, mobilenet_v2_path

__all__ = ["MODELS", "BlockStats", "ExitModel", "SplittableModel", "SubModel", "load_model"]

INPUT_SHAPE = (3, 32, 32)
MODELS = ("mobilenet_v2", "small_cnn")


def load_model(name: str, num_classes: int = 10, pretrained: bool = True, seed: int = 0) -> SplittableModel:
    """The named model with its pretrained backbone (when it has one) and a fresh head for
    ``num_classes``, created right after ``torch.manual_seed(seed)``. In eval mode.
    ``NAME+exits`` adds early exits at the default positions, ``NAME+exits:7,11`` at those
    (``toolkit.models.exits``); the model's id then names its positions."""
    name, exits = split_spec(name)
    root: MobileNetV2 | SmallCNN
    if name == "mobilenet_v2":
        root = MobileNetV2()
        if pretrained:
            state = load_verified_state_dict(mobilenet_v2_path(), MOBILENET_V2_SHA256)
            root.load_state_dict(state)
    elif name == "small_cnn":
        torch.manual_seed(seed)  # its backbone is random: seed it so every process builds the same model
        root = SmallCNN(num_classes)
    else:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    model = SplittableModel(name, root, root.block_names, INPUT_SHAPE, num_classes)
    model.new_head(num_classes, seed=seed)
    root.eval()
    return model if exits is None else ExitModel(model, exits, seed=seed)
