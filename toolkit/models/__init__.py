"""The model zoo: pretrained backbones as SplittableModels with a fresh head."""

from __future__ import annotations

import torch

from toolkit.errors import ModelError
from toolkit.models.efficientnet_lite import EfficientNetLite, remap_state_dict
from toolkit.models.exits import ExitModel, split_spec
from toolkit.models.mobilenet_v2 import MobileNetV2
from toolkit.models.saved import PREFIX, load_saved
from toolkit.models.small_cnn import SmallCNN
from toolkit.models.splittable import BlockStats, SplittableModel, SubModel
from toolkit.models.weights import load_weights

__all__ = ["MODELS", "BlockStats", "ExitModel", "SplittableModel", "SubModel", "load_model"]

INPUT_SHAPE = (3, 32, 32)
MODELS = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "small_cnn")


def backbone(name: str, pretrained: bool = True) -> MobileNetV2 | EfficientNetLite:
    """The named ImageNet backbone with its 1000-class classifier (pretrained: the registry
    package's weights, every tensor of the file loaded)."""
    root: MobileNetV2 | EfficientNetLite
    if name == "mobilenet_v2":
        root = MobileNetV2()
        if pretrained:
            root.load_state_dict(load_weights(name))
    elif name.startswith("efficientnet_lite"):
        root = EfficientNetLite(name)
        if pretrained:
            root.load_state_dict(remap_state_dict(load_weights(name), name))
    else:
        raise ModelError(f"unknown backbone {name!r}")
    return root


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
    if name in ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1"):
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
