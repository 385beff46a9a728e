"""The multi-stage schedule as pure functions: which stage the next round belongs to, how many
phones a round wants, and each phone's shuffling seed.

A stage ends after its ``rounds`` aggregated rounds, or on a plateau: the best accuracy of its
last ``plateau_patience`` rounds is not ``plateau_min_delta`` above the best before them.
Rounds without an accuracy are skipped. Accuracies come from one source per run: the
evaluator's (recorded per model version) once it has recorded any, else the sample-weighted
mean of what phones reported with their pushes. The check runs when a round closes, before
the evaluator can have seen the version that round made, so with an evaluator a plateau is
noticed one round later.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from toolkit.aggregator.config import Stage


def plateaued(accuracies: Sequence[float | None], patience: int, min_delta: float) -> bool:
    known = [a for a in accuracies if a is not None]
    if patience < 1 or len(known) <= patience:
        return False
    return max(known[-patience:]) < max(known[:-patience]) + min_delta


def stage_finished(stage: Stage, accuracies: Sequence[float | None]) -> bool:
    """``accuracies``: one per aggregated round of the stage so far, oldest first."""
    return len(accuracies) >= stage.rounds or plateaued(accuracies, stage.plateau_patience, stage.plateau_min_delta)


def next_stage(stages: Sequence[Stage], current: int, accuracies: Sequence[float | None]) -> int | None:
    """The stage of the next round: ``current`` unless it has finished, then the following
    one; None when the last stage has finished (the run is done)."""
    if not stage_finished(stages[current], accuracies):
        return current
    return current + 1 if current + 1 < len(stages) else None


def round_sizes(participation: float, available: int, over_selection: float) -> tuple[int, int]:
    """(reports wanted, tasks to hand out) for a round, from the phones available now."""
    target = max(1, math.ceil(participation * available))
    return target, max(target, math.ceil(target * over_selection))


def device_seed(run_seed: int, round_: int, device_id: str) -> int:
    """A phone's shuffling seed for a round: fixed by the run seed, round and device."""
    digest = hashlib.sha256(f"{run_seed}:{round_}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
