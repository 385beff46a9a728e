"""The phone's install: ``phone-requirements.txt`` beside pyproject.toml locks exactly what
``device_runtime`` imports on a phone, each package pinned, the platforms told apart by
environment markers; it is installed with ``pip install --no-deps``, then fedkit itself, also
``--no-deps``. ``pip install fedkit`` keeps working, but resolves everything the base
dependencies declare: on x86-64 the training build's onnx, sympy, h5py and more, which no phone
code imports.

The emulated arm64 phone installs ``pinned("aarch64")``; ``install_here`` unpacks this host's
phone install into a folder and ``isolated_python`` runs an interpreter that sees that folder and
the standard library only, as a phone with that install would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

import device_runtime
from device_runtime.errors import DeployError

LOCK_NAME = "phone-requirements.txt"
INSTALL_TARGET_MB = 150  # the most a phone's install may take, on each platform


def source_root() -> Path:
    """The fedkit checkout whose device_runtime is installed into phones (setup.py and the lock
    beside it)."""
    return Path(device_runtime.__file__).resolve().parent.parent


def lock_path(root: Path | None = None) -> Path:
    return (source_root() if root is None else Path(root)) / LOCK_NAME


def pinned(machine: str, root: Path | None = None) -> tuple[str, ...]:
    """The lock's requirements on ``machine`` (as ``platform.machine()`` names it: ``x86_64``,
    ``aarch64``), markers evaluated for it and dropped: pip evaluates them for the machine pip
    runs on, also when it downloads with ``--platform`` for another."""
    path = lock_path(root)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        message = f"cannot read the phone's lock {path} ({exc.strerror}): it comes with fedkit's source"
        raise DeployError(message) from exc
    specs = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement as exc:
            raise DeployError(f"{path}:{number}: not a requirement ({exc})") from exc
        if requirement.marker is None or requirement.marker.evaluate({"platform_machine": machine}):
            specs.append(f"{requirement.name}{requirement.specifier}")
    return tuple(specs)


def install_here(site: Path) -> None:
    """This host's phone install unpacked into ``site``: the lock's wheels for this host, without
    their dependencies, and device_runtime as installed here (its C kernels built). fedkit's host
    packages, which ``pip install --no-deps fedkit`` puts beside it, are left out: a phone never
    imports them."""
    failure = f"pip could not install the phone's lock into {site}"
    pip("install", ["--target", str(site), "-r", str(lock_path())], failure)
    shutil.copytree(
        Path(device_runtime.__file__).parent,
        Path(site) / "device_runtime",
        ignore=shutil.ignore_patterns("__pycache__"),
    )


def pip(command: str, args: Sequence[str], failure: str, error: type[DeployError] = DeployError) -> None:
    """This host's ``pip command`` (download, install) of wheels only, without their dependencies,
    quietly; raises ``error`` saying ``failure``, with pip's last words, when it fails."""
    argv = [sys.executable, "-m", "pip", command, "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    done = subprocess.run([*argv, "-q", *args], check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise error(f"{failure}:\n{done.stderr.strip()[-2000:]}")


def isolated_python(site: Path) -> tuple[list[str], dict[str, str]]:
    """The argv prefix and environment of this host's Python importing from ``site`` and the
    standard library only: ``-S`` leaves out every site-packages (this environment's, the
    user's), ``-P`` the current folder, and no other ``PYTHON*`` variable is passed on."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    return [sys.executable, "-S", "-P"], env
