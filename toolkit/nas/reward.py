"""The search's reward: a sampled network's validation accuracy scaled by its size.

    R(h) = Acc(h, ε) · (p_h / P) ^ (−β / 100)

``Acc(h, ε)``: network h's validation accuracy with the shared weights ε; ``p_h``: its parameter
count (adapters and classifier included); ``P``: the baseline's, MobileNetV2 with the same head
(``toolkit.nas.space.baseline_params``); ``β``: a positive integer, default 7.

Why this form: the patent trades accuracy against size with a positive integer exponent β, but
its exact formula is not in the text we have. MnasNet's soft constraint, Acc · (size / target)^w
with a small negative w, is the established reading: one multiplicative term, no hard cut-off,
and a constant trade — every halving of the parameters is worth the same factor 2^(β/100) of
accuracy, wherever on the scale it happens. w = −β/100 keeps β a positive integer as the patent
has it; β = 7 is MnasNet's w = −0.07. A network of the baseline's size scores its accuracy.

The check (``tests/toolkit/nas/test_reward.py``): half the baseline's parameters at one point
less accuracy scores higher, 0.84 · 2^0.07 = 0.882 > 0.85; the factor 2^0.07 = 1.05 means half
the size is worth up to ~4 points at 85 %.
"""

from __future__ import annotations

from toolkit.errors import ConfigError

DEFAULT_BETA = 7
FORMULA = "R = Acc · (p / P)^(−β/100)"


def check_beta(beta: int) -> int:
    if isinstance(beta, bool) or not isinstance(beta, int) or beta < 1:
        raise ConfigError(f"reward beta {beta!r}: give a positive whole number (default {DEFAULT_BETA})")
    return beta


def reward(accuracy: float, params: int, baseline_params: int, beta: int = DEFAULT_BETA) -> float:
    """``accuracy`` (a fraction) · (``params`` / ``baseline_params``)^(−``beta``/100)."""
    check_beta(beta)
    if params <= 0 or baseline_params <= 0:
        raise ConfigError(f"parameter counts must be positive, got {params} and baseline {baseline_params}")
    if not 0.0 <= accuracy <= 1.0:
        raise ConfigError(f"accuracy {accuracy} is not a fraction between 0 and 1")
    return accuracy * (params / baseline_params) ** (-beta / 100)
