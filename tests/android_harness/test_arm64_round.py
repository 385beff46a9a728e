"""A round on the emulated arm64 phone: the same round (bundle, shard, seed) as on this x86-64
host gives the same update; the phone's loop syncs with the host's aggregator, its updates are
counted; killed with SIGKILL mid-round, it resumes and submits once.

The bundle is small_cnn's head for the numpy engine (what an arm64 phone trains with: its ONNX
Runtime has no training API). Tolerance of the parity: the two CPUs run the same float32
arithmetic through different kernels (ONNX Runtime's and numpy's for x86-64 and for arm64's
NEON), which sum in other orders; each product and sum then differs by about one float32 ulp
(1e-7 relative), and a round of SGD steps carries that forward. So the decoded updates are
compared to 1e-5 of the update's own largest magnitude: two orders above that rounding, four
below any real difference in what was trained (a different sample or step moves it by ~1e-1).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import PurePosixPath

import numpy as np
import pytest

from android_harness.deploy import LocalTarget
from device_runtime.codec import decode
from toolkit.aggregator.admin import issue_tokens
from toolkit.data import write_shard

pytestmark = pytest.mark.timeout(2400)  # a cold cache builds the rootfs first (minutes)
ROUND = [
    "--round",
    "1",
    "--lr",
    "0.05",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--encoding",
    "fp32",
    "--seed",
    "7",
    "--device-id",
    "phone-a",
    "--holdout",
    "0.1",
]


@pytest.fixture
def inside(arm64_phone):
    """A fresh folder inside the phone: (host path, phone path)."""
    phone_dir = PurePosixPath("/opt/fedkit/test") / uuid.uuid4().hex[:12]
    host_dir = arm64_phone.host_path(phone_dir)
    host_dir.mkdir(parents=True)
    yield host_dir, phone_dir
    shutil.rmtree(host_dir, ignore_errors=True)


def test_the_same_round_on_arm64_and_x86_64_gives_the_same_update(
    arm64_phone, inside, small_cnn_bundle, fashion_train, tmp_path
):
    # Prepare: one bundle and one shard, on this host and copied into the phone
    host_dir, phone_dir = inside
    bundle = small_cnn_bundle(engines=("numpy",))
    shard = write_shard(tmp_path / "shard.npz", fashion_train.images[:240], fashion_train.labels[:240])
    shutil.copytree(bundle, host_dir / "bundle")
    shutil.copyfile(shard, host_dir / "shard.npz")

    # Execute: the same round natively and on the arm64 phone
    native = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_runtime",
            "train",
            "--bundle",
            str(bundle),
            "--shard",
            str(shard),
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "update.bin"),
            *ROUND,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    emulated = arm64_phone.run(
        [
            "python3",
            "-m",
            "device_runtime",
            "train",
            "--bundle",
            str(phone_dir / "bundle"),
            "--shard",
            str(phone_dir / "shard.npz"),
            "--workdir",
            str(phone_dir / "work"),
            "--out",
            str(phone_dir / "update.bin"),
            *ROUND,
        ],
        timeout=900,
    )

    # Assert
    assert native.returncode == 0, native.stderr
    assert emulated.returncode == 0, emulated.stderr
    on_x86, on_arm = (decode(p.read_bytes()) for p in (tmp_path / "update.bin", host_dir / "update.bin"))
    assert on_arm.header.num_samples == on_x86.header.num_samples and set(on_arm.tensors) == set(on_x86.tensors)
    for name, x86 in on_x86.tensors.items():
        scale = float(np.abs(x86).max())
        assert scale > 0, name  # the round moved it
        np.testing.assert_allclose(on_arm.tensors[name], x86, rtol=0, atol=1e-5 * scale, err_msg=name)
    stats = json.loads(emulated.stdout.strip().splitlines()[-1])
    assert stats["steps"] > 0 and stats["peak_rss_mb"] > 0


@pytest.fixture
def aggregator(serve_run, small_cnn_bundle):
    """The host's aggregator on loopback (two rounds, small_cnn's head)."""
    return serve_run(small_cnn_bundle(engines=("numpy",)))


def test_an_arm64_phone_syncs_with_the_host_and_resumes_after_sigkill(
    arm64_phone, inside, aggregator, small_cnn_bundle, fashion_train, tmp_path
):
    # Prepare: a phone folder inside the arm64 phone, the phone's credential for the host's aggregator
    host_dir, phone_dir = inside
    url, coordinator = aggregator
    (token,) = issue_tokens(coordinator.store, 1)
    credential = tmp_path / "credential.json"
    credential.write_text(json.dumps({"url": url, "device_id": "arm-1", "enrol_token": token}))
    shard = write_shard(tmp_path / "shard.npz", fashion_train.images[:400], fashion_train.labels[:400])
    LocalTarget(host_dir / "phone").install([small_cnn_bundle(engines=("numpy",))], shard, credential)
    events = host_dir / "phone" / "events.jsonl"
    loop = ["python3", "-m", "device_runtime.phone_loop", str(phone_dir / "phone")]

    # Execute: start the loop in the phone, SIGKILL it once it trains round 1, start it again
    first = arm64_phone.start(loop, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (events.exists() and '"event": "round"' in events.read_text()):
        assert first.poll() is None, "the phone loop ended before its first round"
        assert time.monotonic() < deadline, "no round within 10 minutes"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    again = arm64_phone.run(loop, timeout=900)

    # Assert: the run finished, each round counted once, both updates aggregated
    assert again.returncode == 0, again.stderr
    assert coordinator.store.get_meta("done") == "1"
    updates = coordinator.store.updates()
    assert sorted((u.device_id, u.round) for u in updates) == [("arm-1", 1), ("arm-1", 2)]
    assert [u.version for u in sorted(updates, key=lambda u: u.round)] == [1, 2]  # in the aggregate of its round
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["round"] for e in logged if e["event"] == "upload" and e["status"] == "accepted"] == [1, 2]
    assert sum(e["event"] == "start" for e in logged) == 2  # killed once, started again


def test_early_exit_inference_on_arm64_decides_as_on_x86_64(arm64_phone, inside, fashion_train, fashion_test, tmp_path):
    # Prepare: a trained small_cnn with exits after blocks 0 and 1, exported as the phone's
    # early-exit folder, and 200 test images; a threshold halfway between two of the first
    # exit's confidences, so images leave at every exit and none sits on the threshold
    from early_exit_helpers import between, predict_argv, torch_logits, trained_exit_model

    from device_runtime.early_exit import confidence
    from exporters.early_exit import export_early_exit
    from toolkit.data import LABEL_NAMES

    host_dir, phone_dir = inside
    model = trained_exit_model(fashion_train.images[:2000], fashion_train.labels[:2000])
    export_early_exit(model, host_dir / "early_exit", label_names=LABEL_NAMES)
    images, labels = fashion_test.images[:200], fashion_test.labels[:200]
    np.savez(host_dir / "images.npz", images=images, labels=labels)
    threshold = between(confidence(torch_logits(model, images)[:, 0], "max_softmax"), 0.5)

    # Execute: python -m device_runtime predict on this host and on the arm64 phone
    native = subprocess.run(
        [sys.executable, *predict_argv(host_dir / "early_exit", host_dir / "images.npz", threshold)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    emulated = arm64_phone.run(
        ["python3", *predict_argv(phone_dir / "early_exit", phone_dir / "images.npz", threshold)], timeout=900
    )

    # Assert: every image leaves at the same exit with the same class on both CPUs
    assert native.returncode == 0, native.stderr
    assert emulated.returncode == 0, emulated.stderr
    on_x86, on_arm = json.loads(native.stdout), json.loads(emulated.stdout.strip().splitlines()[-1])
    assert on_arm["exits"] == on_x86["exits"] and len(set(on_x86["exits"])) == 3
    assert on_arm["labels"] == on_x86["labels"] and on_arm["accuracy"] == on_x86["accuracy"] > 0.2  # chance: 0.1
    assert on_arm["mean_mflops"] == on_x86["mean_mflops"]
