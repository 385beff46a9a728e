"""How the probe times: each item's fastest run, round-robin with the others (the conv kernel
that gives the GFLOP/s among them), over a count of rounds and, for a full profile, a span of
time. Timed with a clock the runs advance, so nothing here depends on this host's speed."""

from __future__ import annotations

import json
import subprocess

import pytest

from android_harness import probe
from toolkit.models import load_model
from toolkit.profiling import adb, local, measure_local


class Clock:
    """A clock that moves only when a run says how long it took (durations in halves of a
    second, so the sums are exact)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _item(clock: Clock, name: str, seconds: list[float], calls: list[str]):
    """A run that takes ``seconds[i]`` the i-th time (the last one from then on)."""

    def run() -> None:
        calls.append(name)
        clock.now += seconds[min(calls.count(name) - 1, len(seconds) - 1)]

    return run


def test_fastest_is_each_items_fastest_timed_run_taken_round_robin():
    clock, calls = Clock(), []
    # the warm-up (first) run is the fastest of a's, and must not count
    a = _item(clock, "a", [0.5, 3.0, 1.0, 2.0], calls)
    b = _item(clock, "b", [9.0, 4.0, 5.0, 6.0], calls)

    best = probe.fastest([a, b], repeats=3, clock=clock)

    assert best == [1.0, 4.0]
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then rounds: both in every round


def test_min_seconds_outlasts_a_burst_of_load_that_a_count_of_rounds_does_not():
    """Another process's burst slows every run of the first rounds, the long item twice as
    much as the short one (it is less often left alone for a whole run): over a few rounds the
    ratio of the two (what the planner scales a phone by) is the burst's; rounds spread over
    enough seconds reach the quiet ones and the undisturbed ratio."""

    def timed(min_seconds: float) -> list[float]:
        clock, calls = Clock(), []
        short = _item(clock, "conv", [1.0] + [1.5] * 10 + [1.0], calls)  # warm-up, 10 loaded rounds, quiet
        long = _item(clock, "part", [5.0] + [10.0] * 10 + [5.0], calls)
        return probe.fastest([short, long], repeats=3, min_seconds=min_seconds, clock=clock)

    loaded, quiet = timed(0.0), timed(200.0)

    assert loaded == [1.5, 10.0]
    assert quiet == [1.0, 5.0]


def test_a_count_of_rounds_is_kept_however_long_they_take():
    clock, calls = Clock(), []

    probe.fastest([_item(clock, "slow", [100.0], calls)], repeats=4, min_seconds=1.0, clock=clock)

    assert len(calls) == 1 + 4


@pytest.mark.parametrize(("quick", "repeats", "min_seconds"), [(True, 3, 0.0), (False, 30, 10.0)])
def test_a_local_profile_times_kernels_and_blocks_in_the_same_rounds(monkeypatch, quick, repeats, min_seconds):
    """The conv kernel (the profile's GFLOP/s) is timed in the same rounds as the model's
    blocks, and a full profile spreads them over FULL_SECONDS."""
    assert (local.QUICK_REPEATS, local.FULL_REPEATS, local.FULL_SECONDS) == (3, 30, 10.0)
    asked = []

    def fake_fastest(runs, repeats, min_seconds=0.0, clock=None):
        asked.append((len(runs), repeats, min_seconds))
        return [0.001 * (i + 1) for i in range(len(runs))]

    monkeypatch.setattr(probe, "fastest", fake_fastest)
    model = load_model("small_cnn")

    profile = measure_local(quick=quick, model=model, batch=2)

    kernels_and_blocks = 4 + len(model.block_names)
    assert asked == [(kernels_and_blocks, repeats, min_seconds), (1, repeats, 0.0)]  # then numpy's matmul
    assert set(profile.timing("small_cnn").seconds) == set(model.block_names)


@pytest.mark.parametrize(("quick", "extra"), [(True, []), (False, ["--min-seconds", "10.0"])])
def test_a_full_adb_profile_asks_the_phone_for_full_seconds(monkeypatch, quick, extra):
    commands = []
    result = {
        "probe_version": probe.PROBE_VERSION,
        "cpu_cores": 8,
        "memory_available_mb": 4000.0,
        "engines": ["ort"],
        "items": [],
        "numpy_matmul_gflops": 5.0,
    }

    def fake_adb(serial, *args, timeout=60):
        commands.append(list(args))
        out = json.dumps(result) if args[0] == "shell" and args[1] == "python3" else ""
        return subprocess.CompletedProcess(["adb", *args], 0, out, "")

    monkeypatch.setattr(adb, "_run", fake_adb)

    adb.probe_adb("phone", quick=quick)

    shell = commands[-1]
    assert shell[:3] == ["shell", "python3", f"{adb.REMOTE_DIR}/probe.py"]
    assert shell[4:] == ["--repeats", "3" if quick else "30", *extra]
