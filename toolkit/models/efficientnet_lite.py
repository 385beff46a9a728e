"""EfficientNet-Lite0 and Lite1, laid out block for block like MobileNetV2 (``mobilenet_v2``).

EfficientNet-Lite is EfficientNet without what phones run badly: no squeeze-and-excitation,
ReLU6 instead of swish, and a stem (3→32, stride 2) and head conv (320→1280) that do not scale
with the model. What is left is MobileNetV2's design: a stem, seven stages of inverted-residual
(MBConv) blocks with the same strides (1, 2, 2, 2, 1, 2, 1) and, stage by stage, 16, 24, 40, 80,
112, 192, 320 output channels (MobileNetV2: 16, 24, 32, 64, 96, 160, 320), a 1×1 head conv to
1280. So the modules are MobileNetV2's: ``features.0`` the stem, ``features.1 … features.K`` one
``InvertedResidual`` per MBConv block, ``features.K+1`` the head conv, then ``pool`` and
``classifier``.

Two differences come from TensorFlow, where the weights were trained: BatchNorm's epsilon is
1e-3, and every stride-2 convolution (the stem and each stage's first depthwise conv) pads
TensorFlow's "SAME" way (``SameConv2d``: the extra row and column at the bottom and right).

The ImageNet weights are the registry packages' files (``weights``), written by
EfficientNet-PyTorch with its own key names (``_conv_stem``, ``_blocks.N._expand_conv``, …):
``remap_state_dict`` renames every key to this layout, and refuses a file with keys it does not
know or without keys it needs.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ModelError
from toolkit.models.mobilenet_v2 import InvertedResidual, MBConvNet, conv_bn_relu6

EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
# (kernel, output channels, first stride) per stage, and repeats per stage per variant
_STAGES = [(3, 16, 1), (3, 24, 2), (5, 40, 2), (3, 80, 2), (5, 112, 1), (5, 192, 2), (3, 320, 1)]
REPEATS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    # depth × 1.1, rounded up, except the first and last stages (Lite keeps them as they are)
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
}
STEM, HEAD = 32, 1280


class EfficientNetLite(MBConvNet):
    """features.0 … features.K+1, then pool, then classifier."""

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000):
        if variant not in REPEATS:
            raise ModelError(f"unknown EfficientNet-Lite variant {variant!r}: choose one of {', '.join(REPEATS)}")
        layers: list[nn.Module] = [conv_bn_relu6(3, STEM, 3, 2, eps=EPS, same=True)]
        cin = STEM
        for (kernel, c, stride), n in zip(_STAGES, REPEATS[variant], strict=True):
            expand = 1 if c == 16 else 6  # the first stage does not expand, as in MobileNetV2
            for i in range(n):
                layers.append(InvertedResidual(cin, c, stride if i == 0 else 1, expand, kernel, EPS, same=True))
                cin = c
        layers.append(conv_bn_relu6(cin, HEAD, 1, 1, eps=EPS))
        super().__init__(layers, list(REPEATS[variant]), HEAD, num_classes)
        self.variant = variant


# EfficientNet-PyTorch's names inside one MBConv block → ours (InvertedResidual's conv.<i>)
_EXPANDING_BLOCK = {
    "_expand_conv": "conv.0.0",
    "_bn0": "conv.0.1",
    "_depthwise_conv": "conv.1.0",
    "_bn1": "conv.1.1",
    "_project_conv": "conv.2",
    "_bn2": "conv.3",
}
_PLAIN_BLOCK = {"_depthwise_conv": "conv.0.0", "_bn1": "conv.0.1", "_project_conv": "conv.1", "_bn2": "conv.2"}


def remap_state_dict(state: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch's state dict → ``EfficientNetLite(variant)``'s keys, every tensor kept."""
    blocks = sum(REPEATS[variant])
    top = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_conv_head": f"features.{blocks + 1}.0"}
    top |= {"_bn1": f"features.{blocks + 1}.1", "_fc": "classifier.1"}
    out = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        parts = module.split(".")
        if parts[0] == "_blocks" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < blocks:
            n = int(parts[1])
            names = _PLAIN_BLOCK if n == 0 else _EXPANDING_BLOCK  # only the first block does not expand
            ours = names.get(parts[2])
            new = None if ours is None else f"features.{n + 1}.{ours}.{leaf}"
        else:
            new = None if module not in top else f"{top[module]}.{leaf}"
        if new is None:
            raise ModelError(f"the {variant} weights file has a key fedkit does not know: {key!r}")
        out[new] = tensor
    return out
