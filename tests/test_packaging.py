"""The phone install: device_runtime runs without torch, pip's base install does not pull it, and
the phone's lock (phone-requirements.txt) pins pyproject.toml's base and nothing a phone never
imports, and installed alone trains."""

from __future__ import annotations

import json
import math
import pkgutil
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import device_runtime
from android_harness import arm64, install
from device_runtime.errors import DeployError
from toolkit.data import write_shard

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
MACHINES = ("x86_64", "aarch64")
ONNX_RUNTIMES = {"onnxruntime", "onnxruntime-training-cpu"}


def _by_name(requirements) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in requirements}


def _base_requirements(machine: str) -> dict[str, Requirement]:
    """The base install's requirements on a machine (environment markers evaluated), by name."""
    env = {"platform_machine": machine, "sys_platform": "linux", "python_version": "3.11"}
    requirements = map(Requirement, PYPROJECT["project"]["dependencies"])
    return _by_name(r for r in requirements if r.marker is None or r.marker.evaluate(env))


def _base_on(machine: str) -> set[str]:
    return set(_base_requirements(machine))


def test_base_dependencies_leave_out_torch_and_executorch():
    for machine in ("x86_64", "aarch64"):
        assert not _base_on(machine) & {"torch", "executorch", "torchvision", "torchao"}


def test_one_onnx_runtime_per_platform_never_both():
    # both would write the same onnxruntime/ folder: the last one installed wins, silently
    assert _base_on("x86_64") & ONNX_RUNTIMES == {"onnxruntime-training-cpu"}
    assert _base_on("aarch64") & ONNX_RUNTIMES == {"onnxruntime"}  # no training wheel there
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
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, "torch"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "torch is not available on a phone" in result.stderr


# The phone's lock leaves out what pip install fedkit adds and device_runtime never imports:
# torch, and onnxruntime-training-cpu's declared dependencies (used by its tools only).
NEVER_ON_A_PHONE = {
    "torch",
    "executorch",
    "torchvision",
    "torchao",
    "onnx",
    "sympy",
    "h5py",
    "protobuf",
    "flatbuffers",
    "cerberus",
    "setuptools",
    "packaging",
    "coloredlogs",
}


def test_the_phone_lock_pins_every_base_dependency_within_pyproject():
    for machine in MACHINES:
        lock, base = _by_name(map(Requirement, install.pinned(machine))), _base_requirements(machine)
        assert set(base) <= set(lock), f"{machine}: the lock lacks {sorted(set(base) - set(lock))}"
        for name, requirement in lock.items():
            pins = list(requirement.specifier)
            assert len(pins) == 1 and pins[0].operator == "==", f"{machine}: {requirement} is not one pinned version"
            if name in base:
                assert base[name].specifier.contains(pins[0].version, prereleases=True), (
                    f"{machine}: the lock's {requirement} is not what pyproject.toml allows ({base[name]})"
                )


def test_the_phone_lock_has_pyprojects_one_onnx_runtime_and_nothing_a_phone_never_imports():
    for machine in MACHINES:
        names = set(_by_name(map(Requirement, install.pinned(machine))))
        assert names & ONNX_RUNTIMES == _base_on(machine) & ONNX_RUNTIMES  # one: see the test on pyproject
        assert not names & NEVER_ON_A_PHONE, machine


def test_a_lock_line_that_is_no_requirement_is_refused_with_its_line(tmp_path):
    (tmp_path / install.LOCK_NAME).write_text("numpy==2.4.6\nnot a requirement!\n")
    with pytest.raises(DeployError, match=f"{install.LOCK_NAME}:2: not a requirement"):
        install.pinned("x86_64", tmp_path)


_SEEN = """
import importlib.util, sys
import device_runtime
print(device_runtime.__file__)
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name)))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the lock's training build has x86-64 wheels only")
def test_the_x86_64_phone_install_alone_trains_with_the_ort_engine(small_cnn_bundle, tmp_path):
    # Prepare: the lock's wheels and device_runtime, --no-deps, and a Python that sees them only
    site = tmp_path / "site"
    install.install_here(site)
    argv, env = install.isolated_python(site)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64)
    shard = write_shard(tmp_path / "shard.npz", images, labels)

    # Execute: a round that trains a convolution and the head with ONNX Runtime's training API
    done = subprocess.run(
        [
            *argv,
            "-m",
            "device_runtime",
            "train",
            "--bundle",
            str(small_cnn_bundle(train_blocks=2)),
            "--shard",
            str(shard),
            "--workdir",
            str(tmp_path / "work"),
            "--engine",
            "ort",
            "--holdout",
            "0",
        ],
        env=env,
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported_as = sorted({"protobuf": "google"}.get(name, name) for name in NEVER_ON_A_PHONE)
    seen = subprocess.run(
        [*argv, "-c", _SEEN, *imported_as],
        env=env,
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.splitlines()[-1])
    assert stats["engine"] == "ort" and stats["steps"] > 0 and math.isfinite(stats["train_loss"])
    assert seen.returncode == 0, seen.stderr
    where, importable = seen.stdout.splitlines()
    assert Path(where).is_relative_to(site) and importable == ""  # nothing of this environment leaks in
    assert arm64.tree_size(site) / 1e6 <= install.INSTALL_TARGET_MB
