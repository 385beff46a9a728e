from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from android_harness.availability import churn, offline_until, wait_while_offline


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(10, 1000), st.floats(1, 100), st.floats(1, 100))
def test_churn_windows_are_sorted_disjoint_and_inside_the_run(seed, duration, online, offline):
    trace = churn(seed, duration, online, offline)
    for start, end in trace:
        assert 0 <= start <= end <= duration
    for (_, end), (start, _) in pairwise(trace):
        assert end < start
    assert trace == churn(seed, duration, online, offline)  # the seed fixes it


def test_offline_until_gives_the_end_of_the_window():
    trace = ((10.0, 20.0), (30.0, 35.0))
    assert offline_until(trace, 5.0) is None
    assert offline_until(trace, 10.0) == 20.0
    assert offline_until(trace, 20.0) is None
    assert offline_until(trace, 34.9) == 35.0


def test_wait_while_offline_sleeps_out_consecutive_windows():
    now = [100.0 + 12.0]  # t0 = 100: 12 s into the run, inside the first window
    seen = []

    def sleep(s):
        now[0] += s

    wait_while_offline(((10.0, 20.0), (20.0, 25.0)), 100.0, lambda a, b: seen.append((a, b)), sleep, lambda: now[0])
    assert now[0] == 125.0
    assert seen == [(112.0, 120.0), (120.0, 125.0)]
