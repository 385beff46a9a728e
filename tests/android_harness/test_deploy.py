from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from android_harness.deploy import AdbTarget, DeployError, deploy, target
from device_runtime.bundle import Bundle
from device_runtime.errors import BundleError, FedkitError


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


def test_a_damaged_bundle_is_refused_before_anything_is_copied(small_cnn_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_cnn_bundle(), broken)
    victim = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError):
        deploy([broken], f"local:{tmp_path / 'phone'}")
    assert not (tmp_path / "phone" / "bundles" / "broken").exists()


def test_a_malformed_credential_is_refused(small_cnn_bundle, tmp_path):
    bad = tmp_path / "cred.json"
    bad.write_text("{}")
    with pytest.raises(FedkitError, match="not a credential"):
        deploy([small_cnn_bundle()], f"local:{tmp_path / 'phone'}", credential=bad)


def test_adb_without_a_device_is_a_clear_error(small_cnn_bundle):
    with pytest.raises(DeployError, match="no phone 'fedkit-test-serial' attached|adb is not installed"):
        AdbTarget("fedkit-test-serial").install([small_cnn_bundle()], None, None)


@pytest.mark.parametrize("spec", ["usb:x", "local:", "adb"])
def test_unknown_targets_are_refused(spec):
    with pytest.raises(DeployError, match="local:DIR or adb:SERIAL"):
        target(spec)


def test_cli_deploys_locally_and_fails_cleanly_on_adb(small_cnn_bundle, shard, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    ok = CliRunner().invoke(app, ["deploy", str(small_cnn_bundle()), "--target", f"local:{tmp_path / 'p'}", "--shard", str(shard)])
    assert ok.exit_code == 0, ok.output
    assert "1 bundle(s) verified there" in " ".join(ok.output.split())
    bad = CliRunner().invoke(app, ["deploy", str(small_cnn_bundle()), "--target", "adb:fedkit-test-serial"])
    assert bad.exit_code == 1
