"""``arm64:NAME``: deploying to the emulated arm64 phone (android_harness/arm64.py), the hashes
checked inside it by its own Python, and ``--start`` running the phone loop there for a whole run
against an aggregator on this host's loopback.

Skipped where the phone cannot run (saying why), failed under CI=true, like test_arm64.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from android_harness import arm64
from android_harness.deploy import ARM64_PHONES, VERIFY_SCRIPT, Arm64Target, DeployError, deploy, target
from device_runtime.bundle import Bundle
from device_runtime.errors import BundleError
from toolkit.data import write_shard

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def phone(arm64_phone) -> arm64.Arm64Phone:
    return arm64_phone


@pytest.fixture
def name(phone):
    """A fresh phone name; its folder in the phone (and any process started there) goes afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    shutil.rmtree(phone.host_path(ARM64_PHONES / name), ignore_errors=True)


@pytest.fixture
def bundle(small_cnn_bundle):
    return small_cnn_bundle(engines=("numpy",))


@pytest.fixture
def shard(tmp_path, fashion_train):
    return write_shard(tmp_path / "shard.npz", fashion_train.images[:48], fashion_train.labels[:48])


def credential(tmp_path: Path, url: str = "http://127.0.0.1:1", token: str = "t") -> Path:
    path = tmp_path / "cred.json"
    path.write_text(json.dumps({"url": url, "device_id": "arm64-p1", "enrol_token": token}))
    return path


def test_deploy_installs_in_the_phone_and_the_phone_checks_every_hash(
    phone, name, bundle, shard, tmp_path, monkeypatch
):
    ran = []
    real_run = arm64.Arm64Phone.run
    monkeypatch.setattr(
        arm64.Arm64Phone, "run", lambda self, argv, *a, **k: ran.append(list(argv)) or real_run(self, argv, *a, **k)
    )

    done = deploy([bundle], f"arm64:{name}", shard, credential(tmp_path))

    folder = phone.host_path(ARM64_PHONES / name)
    assert done.target == f"arm64:{name}" and done.phone_dir == f"/opt/fedkit/phones/{name}"
    assert done.bundles == (Bundle.load(bundle).bundle_hash,)
    assert (folder / "shard.npz").read_bytes() == shard.read_bytes()
    assert json.loads((folder / "credential.json").read_text())["device_id"] == "arm64-p1"
    # the hashes came from the phone: its own Python ran the verify script on its own path
    assert ["python3", "-c", VERIFY_SCRIPT, f"/opt/fedkit/phones/{name}"] in ran
    again = json.loads(real_run(phone, ["python3", "-c", VERIFY_SCRIPT, done.phone_dir]).stdout.splitlines()[-1])
    assert again == {"bundles": list(done.bundles), "shard": done.shard_sha256}
    with pytest.raises(DeployError, match="already holds a phone"):
        deploy([bundle], f"arm64:{name}", shard, credential(tmp_path))


def test_a_broken_bundle_is_refused_before_anything_is_copied(phone, name, bundle, shard, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    victim = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError):
        deploy([broken], f"arm64:{name}", shard, credential(tmp_path))
    phones = phone.host_path(ARM64_PHONES)
    assert not (phones / name).exists()
    assert list(phones.glob(f".{name}.*")) == []  # no staging folder left


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "../etc", "x" * 65, "sp ace"])
def test_a_bad_name_is_refused(bad):
    with pytest.raises(DeployError):
        target(f"arm64:{bad}")


def test_unknown_targets_name_every_scheme():
    with pytest.raises(DeployError, match="local:DIR, adb:SERIAL or arm64:NAME"):
        target("usb:x")
    assert isinstance(target("arm64:phone1"), Arm64Target)


def test_a_host_name_the_phone_cannot_resolve_is_refused_and_nothing_stays(phone, name, bundle, shard, tmp_path):
    with pytest.raises(DeployError, match=r"cannot resolve 'localhost'.*127\.0\.0\.1:8080"):
        deploy([bundle], f"arm64:{name}", shard, credential(tmp_path, "http://localhost:8080"))
    assert not phone.host_path(ARM64_PHONES / name).exists()


@pytest.fixture
def server(serve_run, bundle):
    """The host's aggregator on loopback, one round of small_cnn's head."""
    return serve_run(bundle, rounds=1)


def test_cli_deploy_start_runs_the_phone_loop_in_the_phone_until_the_run_is_done(
    phone, name, bundle, shard, server, tmp_path
):
    from typer.testing import CliRunner

    from toolkit.aggregator.admin import issue_tokens
    from toolkit.cli import app

    url, coordinator = server
    (token,) = issue_tokens(coordinator.store, 1)
    started = time.monotonic()
    result = CliRunner().invoke(
        app,
        [
            "deploy",
            str(bundle),
            "--target",
            f"arm64:{name}",
            "--shard",
            str(shard),
            "--credential",
            str(credential(tmp_path, url, token)),
            "--start",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"deployed to arm64:{name}: 1 bundle(s) verified there" in result.output
    assert "(arm64, emulated)" in result.output
    pid = int(result.output.split("started (pid ")[1].split()[0])
    folder = phone.host_path(ARM64_PHONES / name)
    events = folder / "events.jsonl"
    try:
        # the loop runs in the phone: chrooted into the arm64 rootfs (once the wrappers exec'd into it)
        root = os.path.realpath(phone.rootfs)
        for _ in range(300):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/root") == root:
                    break
            time.sleep(0.05)
        assert os.readlink(f"/proc/{pid}/root") == root
        deadline = time.monotonic() + 600
        while coordinator.store.get_meta("done") != "1" or '"event": "done"' not in _read(events):
            assert _alive(pid), f"the phone loop ended early:\n{_read(folder / 'phone.log')[-3000:]}"
            assert time.monotonic() < deadline, f"no finished run after 600 s:\n{_read(folder / 'phone.log')[-3000:]}"
            time.sleep(0.5)
        print(f"arm64 deploy --start, one round of 48 images: {time.monotonic() - started:.0f} s")
        logged = [json.loads(line) for line in _read(events).splitlines()]
        uploads = [e for e in logged if e["event"] == "upload"]
        assert [(e["round"], e["status"]) for e in uploads] == [(1, "accepted")]
        assert logged[-1]["event"] == "done"
        for _ in range(100):  # the run is over: the phone loop exits by itself
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    """Whether ``pid`` (a child of this process) still runs; reaps it once it has ended."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # already reaped (by subprocess's own clean-up)
        return False
