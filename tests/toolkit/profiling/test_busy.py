"""A profile says when other processes kept the device busy while it was timed: load that
lasts through every round skews the timings whatever the statistic (``probe.fastest``)."""

from __future__ import annotations

import pytest

from android_harness import probe
from toolkit.profiling import local


def test_cores_busy_elsewhere_are_the_devices_cpu_seconds_less_this_processs(monkeypatch):
    # the device used 10 CPU seconds over 4 s, this process (and its children) 4 of them
    monkeypatch.setattr(probe, "cpu_seconds", lambda: (110.0, 104.0))

    assert probe.cores_elsewhere((100.0, 100.0), 4.0) == 1.5
    assert probe.cores_elsewhere(None, 4.0) is None  # no /proc/stat (an Android app): unknown


@pytest.mark.parametrize(
    ("busy", "warned"),
    [(None, False), (0.05, False), (local.BUSY_ELSEWHERE, False), (0.9, True)],
)
def test_a_profile_timed_while_other_processes_were_busy_says_so(busy, warned):
    result = {
        "probe_version": probe.PROBE_VERSION,
        "cpu_cores": 2,
        "memory_available_mb": 4000.0,
        "engines": ["ort"],
        "items": [],
        "numpy_matmul_gflops": 5.0,
    }
    if busy is not None:  # probes before v4 do not say
        result["busy_elsewhere"] = busy

    notes = local.profile_from_probe(result, "host", "local", None, 32).notes

    assert notes.startswith(f"probe v{probe.PROBE_VERSION}")
    assert ("0.90 cores busy while timing" in notes) == warned and ("quieter" in notes) == warned
