import pytest

from toolkit.aggregator.config import Stage
from toolkit.aggregator.schedule import device_seed, next_stage, plateaued, round_sizes, stage_finished


def stage(**kw):
    return Stage(**{"name": "s", "rounds": 5, "lr": 0.1, **kw})


def test_plateau_needs_patience_rounds_without_improvement():
    assert not plateaued([0.5, 0.6, 0.7], patience=2, min_delta=0.01)
    assert plateaued([0.5, 0.7, 0.705, 0.70], patience=2, min_delta=0.01)
    assert not plateaued([0.5, 0.7], patience=2, min_delta=0.01)  # not enough history
    assert not plateaued([0.5, None, None, 0.6], patience=2, min_delta=0.01)  # unknown rounds skipped
    assert not plateaued([0.5, 0.5, 0.5], patience=0, min_delta=0.01)  # check off


def test_stage_ends_after_its_rounds_or_on_plateau():
    assert not stage_finished(stage(), [0.1, 0.2])
    assert stage_finished(stage(), [0.1] * 5)
    assert stage_finished(stage(plateau_patience=2), [0.5, 0.6, 0.6, 0.6])


def test_next_stage_moves_on_and_ends_the_run():
    stages = [stage(name="a", rounds=1), stage(name="b", rounds=2)]
    assert next_stage(stages, 0, []) == 0
    assert next_stage(stages, 0, [0.3]) == 1
    assert next_stage(stages, 1, [0.3]) == 1
    assert next_stage(stages, 1, [0.3, 0.4]) is None


@pytest.mark.parametrize(
    "participation, available, over, expected",
    [(1.0, 10, 1.3, (10, 13)), (0.5, 10, 1.0, (5, 5)), (0.1, 3, 2.0, (1, 2)), (0.5, 0, 1.3, (1, 2))],
)
def test_round_sizes(participation, available, over, expected):
    assert round_sizes(participation, available, over) == expected


def test_device_seed_is_fixed_per_run_round_and_device():
    assert device_seed(0, 1, "a") == device_seed(0, 1, "a")
    assert len({device_seed(0, 1, "a"), device_seed(0, 2, "a"), device_seed(0, 1, "b"), device_seed(1, 1, "a")}) == 4
