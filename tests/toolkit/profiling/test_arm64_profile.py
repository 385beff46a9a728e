"""``fedkit profile --arm64``: the probe run inside the emulated arm64 phone (android_harness/arm64.py).

Skipped where the phone cannot run (saying why), failed under CI=true, like
tests/android_harness/test_arm64.py.
"""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from android_harness import arm64
from toolkit.cli import app
from toolkit.profiling import DeviceProfile

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def phone(arm64_phone) -> arm64.Arm64Phone:
    return arm64_phone


@pytest.fixture
def aggregator(serve_run, small_cnn_bundle):
    """A `fedkit serve` app on loopback: its /probe/echo route."""
    url, _ = serve_run(small_cnn_bundle(engines=("numpy",)), rounds=1)
    return url


def test_profile_arm64_says_it_is_emulated_and_trains_with_numpy(phone, aggregator, tmp_path):
    out = tmp_path / "p.json"
    started = time.monotonic()
    result = CliRunner().invoke(app, ["profile", "--arm64", "--aggregator", aggregator, "--out", str(out)])
    print(f"fedkit profile --arm64 --aggregator: {time.monotonic() - started:.0f} s")

    assert result.exit_code == 0, result.output
    p = DeviceProfile.load(out)
    assert p.source == "arm64-emulated" and p.name == "arm64-emulated"
    assert p.engines == ("numpy",)  # the phone's onnxruntime is the inference build
    assert p.gflops > 0 and set(p.kernel_gflops) == {"conv", "pointwise", "depthwise", "matmul"}
    assert p.notes.startswith("emulated arm64 under qemu user mode: the timings say nothing about a real phone's speed")
    assert p.link is not None and p.link.rtt_ms > 0  # measured from inside the phone
    assert json.loads(out.read_text())["source"] == "arm64-emulated"
    assert "(arm64-emulated)" in result.output


def test_profile_arm64_refuses_localhost_which_the_phone_cannot_resolve():
    result = CliRunner().invoke(app, ["profile", "--arm64", "--aggregator", "http://localhost:8080"])
    assert result.exit_code == 1
    assert "http://127.0.0.1:8080" in result.output


def test_profile_arm64_is_one_of_the_sources():
    result = CliRunner().invoke(app, ["profile", "--arm64", "--local"])
    assert result.exit_code == 1
    assert "choose one of --local, --adb SERIAL, --arm64 or --catalog CLASS" in result.output
