"""Deploying a phone: bundle(s), data shard and credential into a phone folder, verified there.

Targets (``fedkit deploy --target``):

- ``local:DIR`` — a folder on this host (an emulated phone); verified with ``Bundle.load`` on
  the copy and the shard's sha256 re-computed there; started as a ``device_runtime`` process.
- ``adb:SERIAL`` — a phone over Debian's ``adb`` with Python, numpy and onnxruntime (e.g.
  Termux): the ``device_runtime`` package is pushed beside the phone folder, the phone checks
  every hash itself (``Bundle.load`` and the shard's sha256, run with the phone's Python), and
  the loop is started with ``nohup``.

The phone folder's layout is ``device_runtime.phone_loop``'s.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import device_runtime
from device_runtime.bundle import Bundle, sha256_file
from device_runtime.errors import FedkitError
from device_runtime.phone_loop import BUNDLES, CREDENTIAL, SHARD, Credential

ADB_ROOT = "/data/local/tmp/fedkit"  # the phone's folder for everything fedkit pushes


class DeployError(FedkitError):
    """A deploy could not be done or did not verify on the target."""


@dataclass(frozen=True)
class Deployed:
    target: str
    phone_dir: str  # on the target
    bundles: tuple[str, ...]  # bundle hashes, verified on the target
    shard_sha256: str | None
    started: str | None = None  # how the runtime was started (pid or command)


class Target(Protocol):
    def install(self, bundles: Sequence[Path], shard: Path | None, credential: Path | None) -> Deployed: ...

    def start(self) -> str: ...


class LocalTarget:
    def __init__(self, phone_dir: str | Path):
        self.root = Path(phone_dir)

    def install(self, bundles: Sequence[Path], shard: Path | None, credential: Path | None) -> Deployed:
        hashes = []
        for src in bundles:
            source = Bundle.load(src)  # refuse to copy a bundle that is already broken
            dst = self.root / BUNDLES / Path(src).name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            copy = Bundle.load(dst)
            if copy.bundle_hash != source.bundle_hash:
                raise DeployError(f"the copy of {src} in {dst} has another bundle hash: the copy is damaged, deploy again")
            hashes.append(copy.bundle_hash)
        digest = None
        if shard is not None:
            want = sha256_file(Path(shard))
            _copy_atomic(Path(shard), self.root / SHARD)
            digest = sha256_file(self.root / SHARD)
            if digest != want:
                raise DeployError(f"the shard copied to {self.root / SHARD} has another sha256 than {shard}: deploy again")
        if credential is not None:
            Credential.load(Path(credential))  # refuse a malformed one
            _copy_atomic(Path(credential), self.root / CREDENTIAL)
        return Deployed(f"local:{self.root}", str(self.root), tuple(hashes), digest)

    def start(self) -> str:
        log = open(self.root / "phone.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "device_runtime.phone_loop", str(self.root)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return f"pid {proc.pid}"


class AdbTarget:
    def __init__(self, serial: str, python: str = "python3", remote_root: str = ADB_ROOT, adb: str = "adb"):
        self.serial = serial
        self.python = python
        self.remote = f"{remote_root}/{serial.replace(':', '_')}"
        self.adb = adb

    def _adb(self, *args: str, check: bool = True) -> str:
        if shutil.which(self.adb) is None:
            raise DeployError("adb is not installed: apt-get install adb (Debian) or the Android platform tools")
        try:
            proc = subprocess.run([self.adb, "-s", self.serial, *args], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"adb {' '.join(args[:2])} on {self.serial} timed out after 300 s: check the USB link") from exc
        if check and proc.returncode != 0:
            raise DeployError(f"adb {' '.join(args[:2])} on {self.serial} failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def check_device(self) -> None:
        state = self._adb("get-state", check=False).strip()
        if state != "device":
            raise DeployError(
                f"no phone {self.serial!r} attached (adb get-state: {state or 'not found'}): "
                "connect it with USB debugging on, or pick a serial from `adb devices`"
            )

    def install(self, bundles: Sequence[Path], shard: Path | None, credential: Path | None) -> Deployed:
        self.check_device()
        for src in bundles:
            Bundle.load(src)
        self._adb("shell", f"mkdir -p {shlex.quote(self.remote)}/{BUNDLES}")
        self._adb("push", str(Path(device_runtime.__file__).parent), f"{self.remote}/")
        for src in bundles:
            self._adb("push", str(src), f"{self.remote}/{BUNDLES}/")
        want = None
        if shard is not None:
            want = sha256_file(Path(shard))
            self._adb("push", str(shard), f"{self.remote}/{SHARD}")
        if credential is not None:
            Credential.load(Path(credential))
            self._adb("push", str(credential), f"{self.remote}/{CREDENTIAL}")
        report = json.loads(self._adb("shell", self._on_phone(VERIFY_SCRIPT)).strip().splitlines()[-1])
        if want is not None and report["shard"] != want:
            raise DeployError(f"the shard on {self.serial} has sha256 {report['shard']}, expected {want}: deploy again")
        return Deployed(f"adb:{self.serial}", self.remote, tuple(report["bundles"]), report["shard"])

    def start(self) -> str:
        self.check_device()
        command = f"nohup {self._python_in_remote()} -m device_runtime.phone_loop {shlex.quote(self.remote)} > {shlex.quote(self.remote)}/phone.log 2>&1 &"
        self._adb("shell", command)
        return command

    def _python_in_remote(self) -> str:
        return f"cd {shlex.quote(self.remote)} && PYTHONPATH={shlex.quote(self.remote)} {shlex.quote(self.python)}"

    def _on_phone(self, script: str) -> str:
        return f"{self._python_in_remote()} -c {shlex.quote(script)} {shlex.quote(self.remote)}"


# Runs on the phone with its own Python: every bundle verified by the phone's loader, the shard hashed.
VERIFY_SCRIPT = """
import json, os, sys
from device_runtime.bundle import Bundle, sha256_file
root = sys.argv[1]
bundles = [Bundle.load(os.path.join(root, "bundles", n)).bundle_hash for n in sorted(os.listdir(os.path.join(root, "bundles")))]
shard = os.path.join(root, "shard.npz")
print(json.dumps({"bundles": bundles, "shard": sha256_file(shard) if os.path.exists(shard) else None}))
"""


def target(spec: str) -> Target:
    """``local:DIR`` or ``adb:SERIAL``."""
    kind, _, where = spec.partition(":")
    if kind == "local" and where:
        return LocalTarget(where)
    if kind == "adb" and where:
        return AdbTarget(where)
    raise DeployError(f"target {spec!r} is not local:DIR or adb:SERIAL")


def deploy(
    bundles: Sequence[Path], target_spec: str, shard: Path | None = None, credential: Path | None = None, start: bool = False
) -> Deployed:
    t = target(target_spec)
    done = t.install([Path(b) for b in bundles], shard, credential)
    if start:
        done = Deployed(done.target, done.phone_dir, done.bundles, done.shard_sha256, t.start())
    return done


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
