"""The best exit-point model rule: the highest mean exit accuracy, then within 0.1 point of it the
lowest total loss."""

import pytest

from toolkit.aggregator.best import TOLERANCE, best_exit_model
from toolkit.aggregator.store import ExitEvaluation, ExitScore


def evaluation(version: int, accuracies: tuple[float, ...], loss: float) -> ExitEvaluation:
    exits = tuple(ExitScore(p, a, 1.0) for p, a in zip((7, 11, 19), accuracies, strict=False))
    return ExitEvaluation(version, version, accuracies[-1], loss, exits)


def test_no_evaluations_no_best():
    assert best_exit_model([]) is None


def test_the_highest_mean_accuracy_wins_when_no_other_is_close():
    evaluations = [evaluation(1, (0.60, 0.70), 3.0), evaluation(2, (0.70, 0.80), 9.0), evaluation(3, (0.65, 0.80), 1.0)]
    assert best_exit_model(evaluations).version == 2  # mean 0.75 beats 0.725, whatever their losses


def test_the_mean_over_exits_counts_not_the_final_exit():
    early_strong = evaluation(1, (0.80, 0.80), 2.0)  # mean 0.80
    final_strong = evaluation(2, (0.60, 0.90), 2.0)  # mean 0.75, the better final exit
    assert best_exit_model([early_strong, final_strong]).version == 1


def test_within_a_tenth_of_a_point_the_lowest_total_loss_wins():
    top = evaluation(1, (0.800, 0.900), 2.0)  # mean 0.850
    close = evaluation(2, (0.799, 0.899), 1.5)  # mean 0.849: exactly 0.1 point lower, counts as within
    too_far = evaluation(3, (0.798, 0.899), 0.5)  # mean 0.8485: over 0.1 point lower
    assert best_exit_model([top, close, too_far]).version == 2
    assert best_exit_model([top, too_far]).version == 1


def test_equal_losses_go_to_the_earlier_version():
    assert best_exit_model([evaluation(4, (0.5, 0.5), 1.0), evaluation(3, (0.5, 0.5), 1.0)]).version == 3


@pytest.mark.parametrize("tolerance", [0.0, TOLERANCE, 0.05])
def test_the_tolerance_widens_the_candidates(tolerance):
    evaluations = [evaluation(1, (0.80, 0.80), 2.0), evaluation(2, (0.78, 0.78), 1.0)]
    assert best_exit_model(evaluations, tolerance).version == (2 if tolerance >= 0.02 else 1)
