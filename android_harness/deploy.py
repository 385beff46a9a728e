"""Deploying a phone: bundle(s), data shard and credential into a phone folder, verified there.

Targets (``fedkit deploy --target``):

- ``local:DIR`` — a folder on this host (an emulated phone); verified with ``Bundle.load`` on
  the copy and the shard's sha256 re-computed there; started as a ``device_runtime`` process.
- ``adb:SERIAL`` — a phone over Debian's ``adb`` with Python, numpy and onnxruntime (e.g.
  Termux): the ``device_runtime`` package is pushed beside the phone folder, the phone checks
  every hash itself (``Bundle.load`` and the shard's sha256, run with the phone's Python), and
  the loop is started with ``nohup``.
- ``arm64:NAME`` — the emulated arm64 phone (``android_harness.arm64``: a Debian arm64 rootfs
  under qemu user mode, built or reused by ``ensure_phone()``): the phone folder is
  ``/opt/fedkit/phones/NAME`` inside its rootfs, installed as a local folder is (through its host
  path), then every hash is checked again inside the phone by the phone's own Python (the same
  script the adb target runs); started as ``python3 -m device_runtime.phone_loop`` in the phone,
  detached. The phone shares this host's network namespace, so a credential's
  ``http://127.0.0.1:PORT`` reaches an aggregator on this host (its rootfs has no /etc/hosts:
  use an address, not ``localhost``).

Everything is checked before anything is copied: every bundle verifies, the shard is an
``.npz`` of images and labels the bundles' model can train on, the credential parses. A phone
cannot run without all three, so all three are required. A local phone folder appears only
whole (installed into a sibling, verified there, then renamed), and an existing phone folder
is never overwritten: a failed deploy leaves nothing behind.

``deploy_fleet`` deploys every phone of ``fedkit export --plan``'s ``phones.json`` to its own
local folder, each with its shard (``fedkit shards``) and a credential made from the
aggregator's URL and one enrolment token (``fedkit enrol-token``).

The phone folder's layout is ``device_runtime.phone_loop``'s.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlsplit

import device_runtime
from device_runtime.bundle import Bundle, sha256_file
from device_runtime.errors import DeployError
from device_runtime.folders import is_free, new_folder
from device_runtime.local_round import load_shard
from device_runtime.phone_loop import BUNDLES, CREDENTIAL, SHARD, Credential

ADB_ROOT = "/data/local/tmp/fedkit"  # the phone's folder for everything fedkit pushes
DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what the aggregator enrols
ARM64_PHONES = PurePosixPath("/opt/fedkit/phones")  # the emulated arm64 phone's phone folders
ARM64_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Deployed:
    target: str
    phone_dir: str  # on the target
    bundles: tuple[str, ...]  # bundle hashes, verified on the target
    shard_sha256: str
    started: str | None = None  # how the runtime was started (pid or command)


class Target(Protocol):
    def install(self, bundles: Sequence[Path], shard: Path, credential: Path) -> Deployed: ...

    def start(self) -> str: ...


def check_phone(bundles: Sequence[Path], shard: Path, credential: Path) -> list[Bundle]:
    """Everything a phone needs, checked on this host before anything is copied."""
    if not bundles:
        raise DeployError("no bundle given: deploy at least one (fedkit export)")
    loaded = [Bundle.load(b) for b in bundles]  # refuse to copy a bundle that is already broken
    names = [Path(b).name for b in bundles]
    if len(set(names)) != len(names):
        raise DeployError(f"bundle folder names repeat ({', '.join(names)}): a phone holds each under its own name")
    classes = {len(b.manifest.label_names) for b in loaded}
    if len(classes) != 1 or len({b.manifest.model_id for b in loaded}) != 1:
        raise DeployError("the bundles are of different models: a phone trains one model")
    load_shard(shard, classes.pop())  # a DataError names what is wrong with it
    Credential.load(Path(credential))
    return loaded


class LocalTarget:
    def __init__(self, phone_dir: str | Path):
        self.root = Path(phone_dir)

    def install(self, bundles: Sequence[Path], shard: Path, credential: Path) -> Deployed:
        sources = check_phone(bundles, shard, credential)
        if not is_free(self.root):
            raise DeployError(f"{self.root} already holds a phone: remove it, or deploy to a new folder")
        hashes = []
        with new_folder(self.root) as staging:
            for src, source in zip(bundles, sources, strict=True):
                dst = staging / BUNDLES / Path(src).name
                shutil.copytree(src, dst)
                if Bundle.load(dst).bundle_hash != source.bundle_hash:
                    raise DeployError(f"the copy of {src} has another bundle hash: the copy is damaged, deploy again")
                hashes.append(source.bundle_hash)
            want = sha256_file(Path(shard))
            shutil.copyfile(shard, staging / SHARD)
            digest = sha256_file(staging / SHARD)
            if digest != want:
                raise DeployError(f"the copy of {shard} has another sha256: deploy again")
            Credential.load(Path(credential)).save(staging / CREDENTIAL)
        return Deployed(f"local:{self.root}", str(self.root), tuple(hashes), digest)

    def start(self) -> str:
        with open(self.root / "phone.log", "ab") as log:  # the phone writes to its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_runtime.phone_loop", str(self.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
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
            raise DeployError(
                f"adb {' '.join(args[:2])} on {self.serial} timed out after 300 s: check the USB link"
            ) from exc
        if check and proc.returncode != 0:
            raise DeployError(
                f"adb {' '.join(args[:2])} on {self.serial} failed: {(proc.stderr or proc.stdout).strip()}"
            )
        return proc.stdout

    def check_device(self) -> None:
        state = self._adb("get-state", check=False).strip()
        if state != "device":
            raise DeployError(
                f"no phone {self.serial!r} attached (adb get-state: {state or 'not found'}): "
                "connect it with USB debugging on, or pick a serial from `adb devices`"
            )

    def install(self, bundles: Sequence[Path], shard: Path, credential: Path) -> Deployed:
        check_phone(bundles, shard, credential)
        self.check_device()
        self._adb("shell", f"mkdir -p {shlex.quote(self.remote)}/{BUNDLES}")
        self._adb("push", str(Path(device_runtime.__file__).parent), f"{self.remote}/")
        for src in bundles:
            self._adb("push", str(src), f"{self.remote}/{BUNDLES}/")
        want = sha256_file(Path(shard))
        self._adb("push", str(shard), f"{self.remote}/{SHARD}")
        self._adb("push", str(credential), f"{self.remote}/{CREDENTIAL}")
        report = json.loads(self._adb("shell", self._on_phone(VERIFY_SCRIPT)).strip().splitlines()[-1])
        if report["shard"] != want:
            raise DeployError(f"the shard on {self.serial} has sha256 {report['shard']}, expected {want}: deploy again")
        return Deployed(f"adb:{self.serial}", self.remote, tuple(report["bundles"]), report["shard"])

    def start(self) -> str:
        self.check_device()
        # nohup on the python command itself: ``nohup cd DIR && ...`` would try to run ``cd`` as a
        # program and never start the loop
        remote = shlex.quote(self.remote)
        command = (
            f"cd {remote} && PYTHONPATH={remote} nohup {shlex.quote(self.python)} -m device_runtime.phone_loop {remote}"
            f" > {remote}/phone.log 2>&1 < /dev/null &"
        )
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
folder = os.path.join(root, "bundles")
bundles = [Bundle.load(os.path.join(folder, n)).bundle_hash for n in sorted(os.listdir(folder))]
shard = os.path.join(root, "shard.npz")
print(json.dumps({"bundles": bundles, "shard": sha256_file(shard) if os.path.exists(shard) else None}))
"""


class Arm64Target:
    """The emulated arm64 phone's folder ``/opt/fedkit/phones/NAME`` (a phone path)."""

    def __init__(self, name: str, cache_dir: Path | None = None):
        if not ARM64_NAME.match(name) or name in (".", ".."):
            raise DeployError(f"arm64 phone name {name!r} is not 1-64 of letters, digits and '_.-': e.g. arm64:phone1")
        self.name = name
        self.cache_dir = cache_dir
        self.phone_dir = ARM64_PHONES / name
        self._phone = None

    def phone(self):
        """The emulated phone (built or reused, ``ensure_phone``), once per target."""
        if self._phone is None:
            from android_harness import arm64  # here: only this target needs it

            self._phone = arm64.ensure_phone(self.cache_dir)
        return self._phone

    def install(self, bundles: Sequence[Path], shard: Path, credential: Path) -> Deployed:
        check_phone(bundles, shard, credential)  # before the phone is built or started
        phone = self.phone()
        host_dir = phone.host_path(self.phone_dir)
        local = LocalTarget(host_dir).install(bundles, shard, credential)
        try:
            url = Credential.load(Path(credential)).url
            self._check_reachable(phone, url)
            done = phone.run(["python3", "-c", VERIFY_SCRIPT, str(self.phone_dir)], timeout=600)
            if done.returncode != 0:
                said = (done.stderr or done.stdout).strip().splitlines()
                raise DeployError(
                    f"the arm64 phone refused {self.phone_dir}: {said[-1] if said else f'exit {done.returncode}'}"
                )
            report = json.loads(done.stdout.strip().splitlines()[-1])
            # the phone lists its bundles in name order: back to the order they were given in
            by_name = dict(zip(sorted(Path(b).name for b in bundles), report["bundles"], strict=True))
            hashes = tuple(by_name[Path(b).name] for b in bundles)
            if hashes != local.bundles:
                raise DeployError(
                    f"the arm64 phone computed other bundle hashes than this host for {self.phone_dir}: deploy again"
                )
            if report["shard"] != local.shard_sha256:
                raise DeployError(
                    f"the shard in the arm64 phone has sha256 {report['shard']}, expected {local.shard_sha256}: "
                    "deploy again"
                )
        except BaseException:
            shutil.rmtree(host_dir, ignore_errors=True)  # a failed deploy leaves nothing behind
            raise
        return Deployed(f"arm64:{self.name}", str(self.phone_dir), hashes, report["shard"])

    @staticmethod
    def _check_reachable(phone, url: str) -> None:
        """The phone resolves the credential's host (its rootfs has no /etc/hosts, so not even
        ``localhost``); an address needs no look-up."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            pass
        done = phone.python(f"import socket; socket.getaddrinfo({host!r}, None)", timeout=120)
        if done.returncode != 0:
            raise DeployError(
                f"the arm64 phone cannot resolve {host!r} (the credential's URL {url}): it shares this host's network "
                "but has no /etc/hosts of its own; put an address in the URL, "
                f"e.g. http://127.0.0.1:{parts.port or 8000} for an aggregator on this host"
            )

    def start(self) -> str:
        phone = self.phone()
        host_dir = phone.host_path(self.phone_dir)
        with open(host_dir / "phone.log", "ab") as log:
            proc = phone.start(
                ["python3", "-m", "device_runtime.phone_loop", str(self.phone_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return f"pid {proc.pid} (arm64, emulated)"


def target(spec: str) -> Target:
    """``local:DIR``, ``adb:SERIAL`` or ``arm64:NAME``."""
    kind, _, where = spec.partition(":")
    if kind == "local" and where:
        return LocalTarget(where)
    if kind == "adb" and where:
        return AdbTarget(where)
    if kind == "arm64" and where:
        return Arm64Target(where)
    raise DeployError(f"target {spec!r} is not local:DIR, adb:SERIAL or arm64:NAME")


def deploy(bundles: Sequence[Path], target_spec: str, shard: Path, credential: Path, start: bool = False) -> Deployed:
    t = target(target_spec)
    done = t.install([Path(b) for b in bundles], Path(shard), Path(credential))
    if start:
        done = Deployed(done.target, done.phone_dir, done.bundles, done.shard_sha256, t.start())
    return done


def deploy_fleet(
    index: dict[str, list[Path]],
    shards: Path,
    url: str,
    enrol_tokens: Sequence[str],
    root: Path,
    start: bool = False,
) -> list[Deployed]:
    """Deploys every phone of ``index`` (phone → bundle folders, ``fedkit export --plan``'s
    ``phones.json``) to ``root/<phone>``, with ``shards/<phone>.npz`` and a credential of
    ``url``, the phone's name as device id and one of ``enrol_tokens`` (in the index's phone
    order). Every phone is checked before the first is deployed; each appears whole or not at all."""
    phones = sorted(index)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeployError(f"aggregator URL {url!r} is not http(s)://HOST:PORT: pass the URL fedkit serve listens on")
    bad = [p for p in phones if not DEVICE_ID.match(p)]
    if bad:
        raise DeployError(
            f"phone names {', '.join(bad)} cannot be device ids (letters, digits, '_.-', at most 64): "
            "rename the profiles"
        )
    if len(enrol_tokens) < len(phones):
        raise DeployError(
            f"{len(phones)} phones need {len(phones)} enrolment tokens, got {len(enrol_tokens)}: "
            f"fedkit enrol-token --count {len(phones)}"
        )
    taken = [str(root / p) for p in phones if (root / p).exists()]
    if taken:
        raise DeployError(f"{', '.join(taken)} already exist: remove them, or deploy to another folder")
    with tempfile.TemporaryDirectory() as tmp:
        credentials = {}
        for phone, token in zip(phones, enrol_tokens, strict=False):
            credentials[phone] = Path(tmp) / f"{phone}.json"
            Credential(url, phone, enrol_token=token).save(credentials[phone])
        for phone in phones:
            check_phone(index[phone], shards / f"{phone}.npz", credentials[phone])
        return [
            deploy(index[phone], f"local:{root / phone}", shards / f"{phone}.npz", credentials[phone], start)
            for phone in phones
        ]
