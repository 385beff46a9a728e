"""The model zoo: pretrained backbones as SplittableModels with a fresh head."""

from __future__ import annotations

import torch

from toolkit.errors import ModelError
from toolkit.models.backbones import BACKBONES, INPUT_SHAPE, backbone
from toolkit.models.efficientnet_lite import EfficientNetLite
from toolkit.models.exits import ExitModel, split_spec
from toolkit.models.mobilenet_v2 import MobileNetV2
from toolkit.models.saved import PREFIX, load_saved
from toolkit.models.small_cnn import SmallCNN
from toolkit.models.splittable import BlockStats, SplittableModel, SubModel

__all__ = ["INPUT_SHAPE", "MODELS", "BlockStats", "ExitModel", "SplittableModel", "SubModel", "backbone", "load_model"]

MODELS = (*BACKBONES, "small_cnn")


def load_model(name: str, num_classes: int = 10, pretrained: bool = True, seed: int = 0) -> SplittableModel:
    """The named model with its pretrained backbone (when it has one) and a fresh head for
    ``num_classes``, created right after ``torch.manual_seed(seed)``. In eval mode.
    ``NAME+exits`` adds early exits at the default positions, ``NAME+exits:7,11`` at those
    (``toolkit.models.exits``); the model's id then names its positions. ``nas:NAME`` is a
    searched network saved as NAME (``toolkit.models.saved``), with its saved weights, its
    trained head too when it has ``num_classes`` classes (``pretrained`` does not apply)."""
    name, exits = split_spec(name)
    root: MobileNetV2 | EfficientNetLite | SmallCNN
    if name.startswith(PREFIX):
        model = load_saved(name.removeprefix(PREFIX))
        if model.num_classes != num_classes:
            model.new_head(num_classes, seed=seed)
        return model if exits is None else ExitModel(model, exits, seed=seed)
    if name in BACKBONES:
        root = backbone(name, pretrained)
    elif name == "small_cnn":
        torch.manual_seed(seed)  # its backbone is random: seed it so every process builds the same model
        root = SmallCNN(num_classes)
    else:
        raise ModelError(
            f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or nas:NAME (a network saved by fedkit search)"
        )
    model = SplittableModel(name, root, root.block_names, INPUT_SHAPE, num_classes)
    model.new_head(num_classes, seed=seed)
    root.eval()
    return model if exits is None else ExitModel(model, exits, seed=seed)
