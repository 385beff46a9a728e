"""`fedkit profile --adb` against the stand-in phone over adb (``fake_adb``, tests/fake_adb.py):
the probe pushed and run on the "phone" (this host's Python), its figures, the adb commands, and
what the user sees when there is no phone or the probe cannot run there."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from fake_adb import PHONE_TMP
from typer.testing import CliRunner

from android_harness import probe
from toolkit.cli import app
from toolkit.models import load_model
from toolkit.profiling import DeviceProfile, probe_adb
from toolkit.profiling.adb import REMOTE_DIR
from toolkit.profiling.kernels import kernels
from toolkit.profiling.local import QUICK_REPEATS

runner = CliRunner()


@pytest.fixture(scope="module")
def host_engines() -> tuple[str, ...]:
    # the phone's python3 is this host's: the probe there finds the engines it finds here
    return tuple(probe.engines_present())


def _memory_total_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemTotal:"))


def test_probe_adb_pushes_the_probe_runs_it_on_the_phone_and_reads_its_figures(fake_adb, host_engines):
    calls, storage = fake_adb

    profile = probe_adb("fake-phone")

    assert (profile.name, profile.source) == ("fake-phone", "adb")
    assert profile.cpu_cores == os.cpu_count()
    assert set(profile.kernel_gflops) == set(kernels()) and min(profile.kernel_gflops.values()) > 0
    assert profile.gflops == profile.kernel_gflops["conv"]  # the device's speed is the conv kernel's
    assert 0 < profile.memory_mb < _memory_total_mb()
    assert profile.engines == host_engines
    assert (profile.link, profile.block_timings) == (None, ())  # no --aggregator, no --model
    assert profile.notes.startswith(f"probe v{probe.PROBE_VERSION}")  # the probe pushed is this fedkit's
    # the phone is there, a clean probe folder, the staged probe's contents into it, then the run
    pushed = calls()[2][3]
    assert calls() == [
        ["-s", "fake-phone", "get-state"],
        ["-s", "fake-phone", "shell", "rm", "-rf", REMOTE_DIR],
        ["-s", "fake-phone", "push", pushed, REMOTE_DIR],
        [
            "-s",
            "fake-phone",
            "shell",
            "python3",
            f"{REMOTE_DIR}/probe.py",
            f"{REMOTE_DIR}/payload",
            "--repeats",
            str(QUICK_REPEATS),
        ],
    ]
    assert pushed.endswith("/.") and not Path(pushed).exists()  # the host's staging folder is gone
    phone = storage / REMOTE_DIR.lstrip("/")
    assert (phone / "probe.py").read_bytes() == Path(probe.__file__).read_bytes()
    assert (phone / "payload" / "probe.json").is_file()


def test_profile_adb_times_a_models_blocks_and_writes_the_profile(fake_adb, host_engines, tmp_path):
    out = tmp_path / "pixel.json"

    options = ["--model", "small_cnn", "--batch", "4", "--name", "pixel", "--out", str(out)]
    result = runner.invoke(app, ["profile", "--adb", "fake-phone", *options])

    assert result.exit_code == 0, result.output
    assert "profile pixel (adb)" in result.output and "profile written to" in result.output
    profile = DeviceProfile.load(out)
    assert (profile.name, profile.source, profile.engines) == ("pixel", "adb", host_engines)
    assert profile.gflops > 0 and profile.memory_mb > 0
    timing = profile.timing("small_cnn")
    assert timing is not None and timing.batch == 4
    assert list(timing.seconds) == load_model("small_cnn").block_names and min(timing.seconds.values()) > 0


def _fails_in_one_line(result, out: Path) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    return lines[0]


def test_profile_adb_without_the_phone_attached_fails_before_pushing_anything(fake_adb, monkeypatch, tmp_path):
    calls, _ = fake_adb
    monkeypatch.setenv("FAKE_ADB_SERIAL", "")  # no phone attached
    out = tmp_path / "phone.json"

    result = runner.invoke(app, ["profile", "--adb", "fake-phone", "--out", str(out)])

    error = _fails_in_one_line(result, out)
    assert "'fake-phone'" in error and "not found" in error and "`adb devices`" in error
    assert calls() == [["-s", "fake-phone", "get-state"]]


# The phone's interpreter (--python), a file in the phone's storage, failing the way a real
# phone's does: none there (sh: not found, exit 127), Python without numpy (Termux's without
# python-numpy: a traceback, exit 1), output cut off mid-line (the probe killed), and the probe's
# own error report (an aggregator it cannot reach: {"error": ...} on stdout, exit 1).
@pytest.mark.parametrize(
    ("script", "options", "said"),
    [
        pytest.param(
            None, [], r"the probe on fake-phone gave no result \(exit 127: .*not found.*pass --python", id="no python"
        ),
        pytest.param(
            f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n',  # -S: no site-packages, so no numpy
            [],
            r"the probe on fake-phone gave no result \(exit 1: .*No module named 'numpy'.*with numpy",
            id="no numpy",
        ),
        pytest.param(
            '#!/bin/sh\necho \'{"probe_version": 4, "cpu_cores": 8, "memory_avail\'\n',
            [],
            r"the probe on fake-phone gave no result \(exit 0: .*memory_avail",
            id="cut off",
        ),
        pytest.param(
            f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
            ["--aggregator", "http://127.0.0.1:9"],  # nothing listens on the discard port
            r"the probe failed on fake-phone: RuntimeError: cannot reach the aggregator probe route",
            id="probe error",
        ),
    ],
)
def test_profile_adb_says_when_the_probe_cannot_run_on_the_phone(fake_adb, tmp_path, script, options, said):
    _, storage = fake_adb
    interpreter = f"{PHONE_TMP}/bin/python3"
    if script is not None:
        on_phone = storage / interpreter.lstrip("/")
        on_phone.parent.mkdir(parents=True)
        on_phone.write_text(script)
        on_phone.chmod(0o755)
    out = tmp_path / "phone.json"

    options = ["--python", interpreter, "--out", str(out), *options]
    result = runner.invoke(app, ["profile", "--adb", "fake-phone", *options])

    assert re.search(said, _fails_in_one_line(result, out)), result.stderr
