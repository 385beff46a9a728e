"""The phone install: device_runtime runs without torch, and pip's base install does not pull it."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import device_runtime

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


def _base_on(machine: str) -> set[str]:
    """The base install's package names on a machine (environment markers evaluated)."""
    from packaging.requirements import Requirement

    env = {"platform_machine": machine, "sys_platform": "linux", "python_version": "3.11"}
    return {_name(r) for r in PYPROJECT["project"]["dependencies"]
            if Requirement(r).marker is None or Requirement(r).marker.evaluate(env)}


def test_base_dependencies_leave_out_torch_and_executorch():
    for machine in ("x86_64", "aarch64"):
        assert not _base_on(machine) & {"torch", "executorch", "torchvision", "torchao"}


def test_one_onnx_runtime_per_platform_never_both():
    # both would write the same onnxruntime/ folder: the last one installed wins, silently
    assert _base_on("x86_64") & {"onnxruntime", "onnxruntime-training-cpu"} == {"onnxruntime-training-cpu"}
    assert _base_on("aarch64") & {"onnxruntime", "onnxruntime-training-cpu"} == {"onnxruntime"}  # no training wheel there
    assert {"numpy", "httpx", "zlib-ng"} <= _base_on("aarch64")


def test_host_extra_pins_torch():
    assert "torch==2.13.0" in PYPROJECT["project"]["optional-dependencies"]["host"]


def test_console_script():
    assert PYPROJECT["project"]["scripts"] == {"fedkit": "toolkit.cli:app"}


# Runs in a fresh interpreter: a meta path finder refuses torch and executorch.exir before
# anything is imported, as on a phone that has neither.
_WITHOUT_TORCH = """
import importlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch" or name == "executorch.exir" or name.startswith("executorch.exir."):
            raise ImportError(f"{name} is not available on a phone")
        return None

sys.meta_path.insert(0, Refuse())
for module in sys.argv[1:]:
    importlib.import_module(module)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok", len(sys.argv) - 1)
"""


def test_device_runtime_imports_without_torch():
    required = ["device_runtime", "device_runtime.bundle", "device_runtime.manifest", "device_runtime.preprocess"]
    every = [m.name for m in pkgutil.walk_packages(device_runtime.__path__, "device_runtime.")]
    modules = list(dict.fromkeys(required + every))

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *modules], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(modules)}"


def test_the_torch_block_works():
    """The check above is only worth something if importing torch really fails under it."""
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "torch"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torch is not available on a phone" in result.stderr
