"""Availability traces: when an emulated phone is offline.

A trace is a sorted tuple of offline windows ``(start, end)`` in seconds from the run's start.
``churn`` draws one: alternating online and offline periods with exponential lengths (a
phone that comes and goes). The phone checks the trace before each task pull, so it goes
offline between rounds, never in the middle of a push.
"""

from __future__ import annotations

import random
import time

Trace = tuple[tuple[float, float], ...]


def churn(
    seed: int, duration_s: float, mean_online_s: float, mean_offline_s: float, online_first: bool = True
) -> Trace:
    """Offline windows over ``duration_s``, periods drawn from exponentials with these means."""
    rng = random.Random(seed)
    t, online, windows = 0.0, online_first, []
    while t < duration_s:
        length = rng.expovariate(1 / (mean_online_s if online else mean_offline_s))
        if not online:
            windows.append((t, min(duration_s, t + length)))
        t += length
        online = not online
    return tuple(windows)


def offline_until(trace: Trace, elapsed_s: float) -> float | None:
    """The end of the offline window ``elapsed_s`` falls in, or None when online then."""
    for start, end in trace:
        if start <= elapsed_s < end:
            return end
    return None


def wait_while_offline(trace: Trace, t0: float, on_offline=None, sleep=time.sleep, clock=time.time) -> None:
    """Blocks while the trace says the phone is offline (``t0``: the run's start, unix seconds);
    ``on_offline(start, end)`` is told of each window waited out."""
    end = offline_until(trace, clock() - t0)
    while end is not None:
        start = clock()
        sleep(max(0.0, t0 + end - start))
        if on_offline:
            on_offline(start, clock())
        end = offline_until(trace, clock() - t0)
