"""A small CNN with MobileNetV2's block structure (features.*, pool, classifier), for fast tests
and quick runs: same input spec, same kinds of layers, a few thousand parameters."""

from __future__ import annotations

from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_conv_bn_relu(3, 8), _conv_bn_relu(8, 16), _conv_bn_relu(16, 32))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))

    @property
    def block_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))] + ["pool", "classifier"]
