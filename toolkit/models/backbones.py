"""The zoo's ImageNet backbones by name, and the input every zoo model takes."""

from __future__ import annotations

from toolkit.errors import ModelError
from toolkit.models.efficientnet_lite import EfficientNetLite, remap_state_dict
from toolkit.models.mobilenet_v2 import MobileNetV2
from toolkit.models.weights import load_weights

INPUT_SHAPE = (3, 32, 32)
BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1")


def backbone(name: str, pretrained: bool = True) -> MobileNetV2 | EfficientNetLite:
    """The named ImageNet backbone with its 1000-class classifier (pretrained: the registry
    package's weights, every tensor of the file loaded)."""
    root: MobileNetV2 | EfficientNetLite
    if name == "mobilenet_v2":
        root = MobileNetV2()
        if pretrained:
            root.load_state_dict(load_weights(name))
    elif name in BACKBONES:
        root = EfficientNetLite(name)
        if pretrained:
            root.load_state_dict(remap_state_dict(load_weights(name), name))
    else:
        raise ModelError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return root
