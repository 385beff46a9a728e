"""MobileNetV2 (width 1.0), defined here with torchvision's state-dict key names.

torchvision from PyPI does not import beside torch 2.13, so the architecture lives in the
project; the ImageNet weights are torchvision's own file, loaded by key. Its inverted-residual
block (``InvertedResidual``) is also EfficientNet-Lite's MBConv block (``efficientnet_lite``),
which differs only in kernel sizes, BatchNorm's epsilon and TensorFlow's "same" padding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class SameConv2d(nn.Conv2d):
    """A stride-2 convolution with TensorFlow's "SAME" padding for an even input side (every
    stride-2 convolution sees one when the image's side is a multiple of 32, as fedkit's 32×32
    and ImageNet's 224×224 are): k - 2 pixels in all, the extra one at the bottom and right.
    PyTorch's symmetric padding would shift the kernel by one pixel against the weights TensorFlow
    trained. Static, so the ONNX export holds a constant Pad."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, 0, groups=groups, bias=False)
        total = max(kernel - stride, 0)
        self.pads = [total // 2, total - total // 2] * 2  # F.pad's order: left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


def conv_bn_relu6(
    cin: int, cout: int, kernel: int, stride: int, groups: int = 1, eps: float = 1e-5, same: bool = False
) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU6; ``same``: TensorFlow's padding for stride 2 (``SameConv2d``)."""
    conv = (
        SameConv2d(cin, cout, kernel, stride, groups)
        if same and stride > 1
        else nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    )
    return nn.Sequential(conv, nn.BatchNorm2d(cout, eps=eps), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    """conv.0 the 1×1 expansion (absent when ``expand`` is 1), then the depthwise conv, the 1×1
    projection and its BatchNorm."""

    def __init__(
        self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3, eps: float = 1e-5, same: bool = False
    ):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(cin, hidden, 1, 1, eps=eps))
        layers += [
            conv_bn_relu6(hidden, hidden, kernel, stride, groups=hidden, eps=eps, same=same),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MBConvNet(nn.Module):
    """The layout MobileNetV2 and EfficientNet-Lite share: features.0 (stem) … features.K+1 (head
    conv), then pool (global average + flatten), then classifier (torchvision's key names:
    classifier.1.weight / classifier.1.bias, behind a dropout of 0.2 as in all three)."""

    def __init__(self, layers: list[nn.Module], stage_repeats: list[int], width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, num_classes))
        self.stage_repeats = stage_repeats  # blocks per stage, features.1 … features.K in order

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))

    @property
    def block_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))] + ["pool", "classifier"]


class MobileNetV2(MBConvNet):
    """features.0 … features.18, then pool, then classifier."""

    def __init__(self, num_classes: int = 1000):
        layers: list[nn.Module] = [conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_relu6(cin, 1280, 1, 1))
        super().__init__(layers, [n for _, _, n, _ in _SETTINGS], 1280, num_classes)
