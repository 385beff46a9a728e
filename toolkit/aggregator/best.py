"""The best exit-point model of a run: the version an exit-model run keeps (the patent's S5.5,
"the exit-point model that minimises the total loss and maximises validation accuracy").

The two aims can disagree, so the rule orders them: the exit-point model's validation accuracy
is the mean of its exits' accuracies (every exit is a model some phone runs); the versions
within ``TOLERANCE`` (0.1 percentage point, inclusive) of the highest are the candidates, and the
one with the lowest total loss (Σᵢ λᵢ · CE at the exits) among them is the best; equal losses go
to the earlier version. Accuracy comes first because it is what a deployed exit is judged on;
0.1 point is 10 of 10,000 test images, within the noise of one evaluation, where the lower
loss (more confident right answers, less confident wrong ones) is the better tie-break.
"""

from __future__ import annotations

from collections.abc import Iterable

from toolkit.aggregator.store import ExitEvaluation

TOLERANCE = 0.001  # of accuracy: 0.1 percentage point
_ROUNDING = 1e-9  # so a difference of exactly TOLERANCE counts as within it, whatever the float rounding


def best_exit_model(evaluations: Iterable[ExitEvaluation], tolerance: float = TOLERANCE) -> ExitEvaluation | None:
    """The best of ``evaluations`` (one per version) by the rule above; None when there are none."""
    evaluations = list(evaluations)
    if not evaluations:
        return None
    top = max(e.mean_accuracy for e in evaluations)
    candidates = [e for e in evaluations if e.mean_accuracy >= top - tolerance - _ROUNDING]
    return min(candidates, key=lambda e: (e.loss, e.version))
