from __future__ import annotations

import pytest

from toolkit.errors import ConfigError
from toolkit.nas.reward import DEFAULT_BETA, reward

P = 2_236_682  # MobileNetV2 with a 10-class head


def test_half_the_parameters_at_one_point_less_beats_the_baseline():
    baseline = reward(0.85, P, P)
    half = reward(0.84, P // 2, P)

    assert baseline == pytest.approx(0.85)  # the baseline's size scores its accuracy
    assert half == pytest.approx(0.84 * 2**0.07, rel=1e-5)
    assert half == pytest.approx(0.882, abs=5e-4)
    assert half > baseline
    assert DEFAULT_BETA == 7


def test_the_size_term_trades_accuracy_for_parameters():
    # a constant trade: each halving is worth the same factor, doubling costs it back
    assert reward(0.8, P // 4, P) / reward(0.8, P // 2, P) == pytest.approx(2**0.07, rel=1e-5)
    assert reward(0.8, 2 * P, P) == pytest.approx(0.8 / 2**0.07)
    # a larger beta weighs size more; equal size: accuracy alone decides
    assert reward(0.84, P // 2, P, beta=20) > reward(0.84, P // 2, P, beta=7)
    assert reward(0.9, P, P, beta=50) > reward(0.8, P, P, beta=50)
    # twice the baseline's parameters must buy about 4 points at 85 %: 3 do not, 5 do
    assert reward(0.88, 2 * P, P) < reward(0.85, P, P) < reward(0.90, 2 * P, P)


@pytest.mark.parametrize("beta", [0, -7, 7.5, True, "7"])
def test_beta_must_be_a_positive_whole_number(beta):
    with pytest.raises(ConfigError, match="positive whole number"):
        reward(0.8, P, P, beta=beta)


@pytest.mark.parametrize(("accuracy", "params"), [(1.2, P), (-0.1, P), (0.5, 0)])
def test_nonsense_inputs_are_refused(accuracy, params):
    with pytest.raises(ConfigError):
        reward(accuracy, params, P)
