from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import device_runtime
from android_harness.deploy import (
    ADB_ROOT,
    VERIFY_SCRIPT,
    AdbTarget,
    DeployError,
    deploy,
    deploy_fleet,
    target,
)
from device_runtime.bundle import Bundle
from device_runtime.errors import BundleError, DataError, FedkitError


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard.npz"
    np.savez(path, images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4, dtype=np.int64))
    return path


@pytest.fixture
def credential(tmp_path):
    path = tmp_path / "cred.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:1", "device_id": "p1", "enrol_token": "t"}))
    return path


def test_local_deploy_installs_and_verifies_on_the_copy(small_cnn_bundle, shard, credential, tmp_path):
    bundle = small_cnn_bundle()
    done = deploy([bundle], f"local:{tmp_path / 'phone'}", shard, credential)
    phone = tmp_path / "phone"
    assert done.bundles == (Bundle.load(bundle).bundle_hash,)
    assert Bundle.load(phone / "bundles" / bundle.name).bundle_hash == done.bundles[0]
    assert (phone / "shard.npz").read_bytes() == shard.read_bytes()
    assert json.loads((phone / "credential.json").read_text())["device_id"] == "p1"


def test_a_damaged_bundle_is_refused_before_anything_is_copied(small_cnn_bundle, shard, credential, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_cnn_bundle(), broken)
    victim = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError):
        deploy([broken], f"local:{tmp_path / 'phone'}", shard, credential)
    assert not (tmp_path / "phone").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_malformed_credential_is_refused(small_cnn_bundle, shard, tmp_path):
    bad = tmp_path / "cred.json"
    bad.write_text("{}")
    with pytest.raises(FedkitError, match="not a credential"):
        deploy([small_cnn_bundle()], f"local:{tmp_path / 'phone'}", shard, bad)
    assert not (tmp_path / "phone").exists()


@pytest.mark.parametrize("content", [b"not a zip at all", None])
def test_a_shard_that_is_not_an_npz_of_images_and_labels_is_refused_before_the_token_is_spent(
    small_cnn_bundle, credential, tmp_path, content
):
    bad = tmp_path / "shard.csv"
    if content is None:  # an .npz, but of something else
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        bad = tmp_path / "other.npz"
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match="shard"):
        deploy([small_cnn_bundle()], f"local:{tmp_path / 'phone'}", bad, credential)
    assert not (tmp_path / "phone").exists()


def test_labels_the_model_cannot_train_on_are_refused(small_cnn_bundle, credential, tmp_path):
    path = tmp_path / "shard.npz"
    np.savez(path, images=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 1, 2, 10]))
    with pytest.raises(DataError, match=r"labels outside 0\.\.9"):
        deploy([small_cnn_bundle()], f"local:{tmp_path / 'phone'}", path, credential)


def test_an_existing_phone_is_never_overwritten(small_cnn_bundle, shard, credential, tmp_path):
    deploy([small_cnn_bundle()], f"local:{tmp_path / 'phone'}", shard, credential)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "phone").rglob("*"))
    with pytest.raises(DeployError, match="already holds a phone"):
        deploy([small_cnn_bundle()], f"local:{tmp_path / 'phone'}", shard, credential)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "phone").rglob("*")) == before


def test_a_fleet_is_checked_whole_before_any_phone_is_deployed(small_cnn_bundle, shard, tmp_path):
    # Prepare: two phones, the second one's shard missing
    bundle = small_cnn_bundle()
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copyfile(shard, shards / "a.npz")
    index = {"a": [bundle], "b": [bundle]}

    # Execute / Assert: nothing deployed, not even phone a
    with pytest.raises(DataError, match=r"b\.npz does not exist"):
        deploy_fleet(index, shards, "http://127.0.0.1:8080", ["t1", "t2"], tmp_path / "phones")
    assert not (tmp_path / "phones" / "a").exists()
    with pytest.raises(DeployError, match="2 enrolment tokens"):
        deploy_fleet(index, shards, "http://127.0.0.1:8080", ["t1"], tmp_path / "phones")
    with pytest.raises(DeployError, match="is not http"):
        deploy_fleet(index, shards, "notaurl", ["t1", "t2"], tmp_path / "phones")

    # and once b's shard is there, each phone gets its own folder, shard and one-time token
    shutil.copyfile(shard, shards / "b.npz")
    done = deploy_fleet(index, shards, "http://127.0.0.1:8080", ["t1", "t2"], tmp_path / "phones")
    assert [d.phone_dir for d in done] == [str(tmp_path / "phones" / p) for p in ("a", "b")]
    creds = [json.loads((tmp_path / "phones" / p / "credential.json").read_text()) for p in ("a", "b")]
    assert creds == [
        {"url": "http://127.0.0.1:8080", "device_id": "a", "enrol_token": "t1"},
        {"url": "http://127.0.0.1:8080", "device_id": "b", "enrol_token": "t2"},
    ]


def adb_install_calls(bundle, shard, credential) -> list[list[str]]:
    """What an adb install must send, in order: the phone is there, its folder, the runtime, the
    bundle, shard and credential, then the phone's own Python checks every hash."""
    remote = f"{ADB_ROOT}/fake-phone"
    verify = f"cd {remote} && PYTHONPATH={remote} python3 -c {shlex.quote(VERIFY_SCRIPT)} {remote}"
    return [
        ["-s", "fake-phone", "get-state"],
        ["-s", "fake-phone", "shell", f"mkdir -p {remote}/bundles"],
        ["-s", "fake-phone", "push", str(Path(device_runtime.__file__).parent), f"{remote}/"],
        ["-s", "fake-phone", "push", str(bundle), f"{remote}/bundles/"],
        ["-s", "fake-phone", "push", str(shard), f"{remote}/shard.npz"],
        ["-s", "fake-phone", "push", str(credential), f"{remote}/credential.json"],
        ["-s", "fake-phone", "shell", verify],
    ]


def test_adb_install_pushes_everything_and_the_phone_checks_every_hash(fake_adb, small_cnn_bundle, shard, credential):
    calls, storage = fake_adb
    bundle = small_cnn_bundle()

    done = deploy([bundle], "adb:fake-phone", shard, credential)

    assert calls() == adb_install_calls(bundle, shard, credential)
    # the hashes come from the phone's check of its own copies, and match this host's
    assert done.bundles == (Bundle.load(bundle).bundle_hash,)
    assert done.shard_sha256 == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert (done.target, done.phone_dir, done.started) == ("adb:fake-phone", "/data/local/tmp/fedkit/fake-phone", None)
    phone = storage / "data/local/tmp/fedkit/fake-phone"
    assert (phone / "device_runtime" / "phone_loop.py").is_file()  # the runtime, beside the phone folder
    assert json.loads((phone / "credential.json").read_text())["device_id"] == "p1"


def test_adb_deploy_start_launches_the_sync_loop_detached(fake_adb, small_cnn_bundle, shard, credential):
    from typer.testing import CliRunner

    from toolkit.cli import app

    calls, storage = fake_adb
    bundle = small_cnn_bundle()

    done = CliRunner().invoke(
        app,
        [
            "deploy",
            str(bundle),
            "--target",
            "adb:fake-phone",
            "--shard",
            str(shard),
            "--credential",
            str(credential),
            "--start",
        ],
    )

    assert done.exit_code == 0, done.output
    remote = "/data/local/tmp/fedkit/fake-phone"
    start = (
        f"cd {remote} && PYTHONPATH={remote} nohup python3 -m device_runtime.phone_loop {remote}"
        f" > {remote}/phone.log 2>&1 < /dev/null &"
    )
    # install first, then: the phone is still there, and the loop is started in the background
    assert calls() == [
        *adb_install_calls(bundle, shard, credential),
        ["-s", "fake-phone", "get-state"],
        ["-s", "fake-phone", "shell", start],
    ]
    assert "started" in done.output
    # the phone's shell really runs the loop: in the phone folder, with the pushed runtime on its path
    started = storage / "started"
    deadline = time.monotonic() + 10  # it runs in the background: wait for it, not for a fixed time
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    phone = f"{storage}{remote}"
    assert started.read_text().split() == [phone, phone, phone]


def test_a_shard_damaged_on_its_way_to_the_phone_is_caught_by_the_phones_check(
    fake_adb, small_cnn_bundle, shard, credential, monkeypatch
):
    monkeypatch.setenv("FAKE_ADB_DAMAGE", "shard.npz")
    with pytest.raises(DeployError, match=r"the shard on fake-phone has sha256 .*, expected "):
        deploy([small_cnn_bundle()], "adb:fake-phone", shard, credential)


def test_adb_without_the_phone_attached_is_a_clear_error(fake_adb, small_cnn_bundle, shard, credential):
    calls, _ = fake_adb
    with pytest.raises(DeployError, match="no phone 'other-serial' attached"):
        AdbTarget("other-serial").install([small_cnn_bundle()], shard, credential)
    assert calls() == [["-s", "other-serial", "get-state"]]  # nothing pushed


def test_adb_not_installed_is_a_clear_error(small_cnn_bundle, shard, credential, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DeployError, match="adb is not installed"):
        AdbTarget("fake-phone").install([small_cnn_bundle()], shard, credential)


@pytest.mark.parametrize("spec", ["usb:x", "local:", "adb"])
def test_unknown_targets_are_refused(spec):
    with pytest.raises(DeployError, match="local:DIR, adb:SERIAL or arm64:NAME"):
        target(spec)


def test_cli_deploys_locally_and_fails_cleanly_on_adb(small_cnn_bundle, shard, credential, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    ok = CliRunner().invoke(
        app,
        [
            "deploy",
            str(small_cnn_bundle()),
            "--target",
            f"local:{tmp_path / 'p'}",
            "--shard",
            str(shard),
            "--credential",
            str(credential),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "1 bundle(s) verified there" in " ".join(ok.output.split())
    bad = CliRunner().invoke(
        app,
        [
            "deploy",
            str(small_cnn_bundle()),
            "--target",
            "adb:fedkit-test-serial",
            "--shard",
            str(shard),
            "--credential",
            str(credential),
        ],
    )
    assert bad.exit_code == 1
