"""`fedkit profile` through the real CLI (typer's CliRunner)."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.profiling import DeviceProfile

runner = CliRunner()


def test_profile_local_writes_a_profile(tmp_path):
    result = runner.invoke(app, ["profile", "--local", "--name", "here", "--out", str(tmp_path / "here.json")])

    assert result.exit_code == 0, result.output
    assert DeviceProfile.load(tmp_path / "here.json").name == "here"
    assert "GFLOP/s" in result.output


@pytest.mark.skipif(shutil.which("adb") is None, reason="needs the adb binary (Debian: apt-get install adb)")
def test_profile_adb_without_a_phone_fails_cleanly():
    result = runner.invoke(app, ["profile", "--adb", "fedkit-no-such-phone"])

    assert result.exit_code == 1
    assert "error:" in result.output and "fedkit-no-such-phone" in result.output
    assert "Traceback" not in result.output


def test_profile_needs_exactly_one_source():
    both = runner.invoke(app, ["profile", "--local", "--adb", "x"])
    neither = runner.invoke(app, ["profile"])

    assert both.exit_code == neither.exit_code == 1
    assert "choose one of --local, --adb SERIAL, --arm64 or --catalog CLASS" in both.output
