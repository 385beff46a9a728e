import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.aggregator.aggregation import Contribution, aggregate, clip_norm, l2_norm, staleness_weight
from toolkit.errors import InternalError


def once(items):
    """A contributions() that may be read only once, like the mean's single streaming pass."""
    calls = []

    def contributions():
        calls.append(1)
        assert len(calls) == 1, "the mean must read the updates in one pass"
        return iter(items)

    return contributions


def test_fedavg_weights_by_samples_per_tensor_over_the_updates_that_hold_it():
    # Prepare: the second phone also trains a deeper tensor
    a = Contribution({"head": np.full(3, 1.0, np.float32)}, num_samples=10)
    b = Contribution({"head": np.full(3, 4.0, np.float32), "deep": np.full(2, 2.0, np.float32)}, num_samples=30)
    # Execute
    out = aggregate(once([a, b]))
    # Assert: head averaged over both, deep over the one update holding it
    np.testing.assert_allclose(out["head"], (10 * 1 + 30 * 4) / 40)
    np.testing.assert_allclose(out["deep"], 2.0)
    assert out["head"].dtype == np.float32


def test_fedbuff_staleness_shrinks_a_stale_update_instead_of_reweighting_the_others():
    fresh = Contribution({"w": np.ones(2, np.float32)}, num_samples=10, staleness=0)
    stale = Contribution({"w": np.ones(2, np.float32)}, num_samples=10, staleness=3)
    out = aggregate(once([fresh, stale]))
    np.testing.assert_allclose(out["w"], (1 + 1 / math.sqrt(4)) / 2, rtol=1e-6)
    constant = aggregate(once([fresh, stale]), staleness_kind="constant")
    np.testing.assert_allclose(constant["w"], 1.0)


def test_staleness_weight():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(8, "constant") == 1.0


def test_clip_norm_scales_large_updates_only():
    big = {"a": np.full(4, 3.0, np.float32), "b": np.full(5, 4.0, np.float32)}
    clipped = clip_norm(big, 1.0)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped["a"] / clipped["b"][0], big["a"] / 4.0, rtol=1e-5)
    small = {"a": np.full(4, 0.1, np.float32)}
    np.testing.assert_array_equal(clip_norm(small, 1.0)["a"], small["a"])


def test_clipping_bounds_one_phones_pull_on_the_mean():
    honest = [Contribution({"w": np.full(4, 0.1, np.float32)}, 10) for _ in range(3)]
    attacker = Contribution({"w": np.full(4, 1e3, np.float32)}, 10)
    out = aggregate(lambda: iter([*honest, attacker]), clip=1.0)
    assert np.abs(out["w"]).max() < 0.3


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregators_ignore_an_outlier(method):
    rng = np.random.default_rng(0)
    honest = [Contribution({"w": (1 + 0.01 * rng.standard_normal((3, 4))).astype(np.float32)}, 10) for _ in range(9)]
    attacker = Contribution({"w": np.full((3, 4), 1e6, np.float32)}, 1000)
    out = aggregate(lambda: iter([*honest, attacker]), method=method, trim_fraction=0.1)
    np.testing.assert_allclose(out["w"], 1.0, atol=0.05)


def test_median_and_trimmed_mean_values():
    rows = [1.0, 2.0, 3.0, 4.0, 100.0]
    items = [Contribution({"w": np.array([v], np.float32)}, 1) for v in rows]
    assert aggregate(lambda: iter(items), method="median")["w"][0] == 3.0
    assert aggregate(lambda: iter(items), method="trimmed_mean", trim_fraction=0.2)["w"][0] == pytest.approx(3.0)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    budget=st.integers(1, 64),
    method=st.sampled_from(["median", "trimmed_mean"]),
    seed=st.integers(0, 2**16),
)
def test_chunked_robust_aggregation_equals_the_whole_at_once(n, sizes, budget, method, seed):
    # Prepare: updates holding random subsets of the tensors
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        names = [f"t{i}" for i in range(len(sizes)) if rng.random() < 0.7] or ["t0"]
        items.append(
            Contribution({name: rng.standard_normal(sizes[int(name[1:])]).astype(np.float32) for name in names}, 1)
        )
    # Execute: a tiny budget forces many chunks
    chunked = aggregate(lambda: iter(items), method=method, budget_floats=budget)
    whole = aggregate(lambda: iter(items), method=method, budget_floats=10**9)
    # Assert: same result, and each tensor against numpy over its holders
    assert chunked.keys() == whole.keys()
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-7)
        rows = np.stack([c.tensors[name] for c in items if name in c.tensors])
        if method == "median":
            np.testing.assert_allclose(whole[name], np.median(rows, axis=0), rtol=1e-6)


def test_aggregating_nothing_is_a_broken_assumption():
    with pytest.raises(InternalError):
        aggregate(lambda: iter([]))
    with pytest.raises(InternalError):
        aggregate(lambda: iter([]), method="median")
