"""device_runtime.optim.SGD steps exactly as torch.optim.SGD does."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime.errors import CheckpointError, EngineError
from device_runtime.optim import SGD

SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.bias": (5,)}


def random_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def run_torch(weights, grads_per_step, lrs, momentum, weight_decay):
    params = {n: torch.tensor(w, requires_grad=True) for n, w in weights.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    for lr, grads in zip(lrs, grads_per_step, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        for name, p in params.items():
            p.grad = torch.tensor(grads[name])
        opt.step()
    return {n: p.detach().numpy() for n, p in params.items()}


def run_numpy(weights, grads_per_step, lrs, momentum, weight_decay, opt=None):
    opt = opt or SGD(lrs[0], momentum=momentum, weight_decay=weight_decay)
    for lr, grads in zip(lrs, grads_per_step, strict=True):
        opt.lr = lr
        weights = opt.step(weights, grads)
    return weights


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-4, 0.5),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.01]),
    seed=st.integers(0, 2**16),
)
def test_steps_match_torch_sgd(lr, momentum, weight_decay, seed):
    # Prepare: eight steps, the learning rate changed halfway as a stage schedule would
    rng = np.random.default_rng(seed)
    weights = random_tensors(rng)
    grads = [random_tensors(rng) for _ in range(8)]
    lrs = [lr] * 4 + [lr / 10] * 4

    # Execute
    ours = run_numpy(weights, grads, lrs, momentum, weight_decay)
    theirs = run_torch(weights, grads, lrs, momentum, weight_decay)

    # Assert
    for name in SHAPES:
        assert ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6)


def test_state_dict_resumes_the_momentum():
    rng = np.random.default_rng(0)
    weights = random_tensors(rng)
    grads = [random_tensors(rng) for _ in range(6)]
    straight = run_numpy(weights, grads, [0.1] * 6, 0.9, 0.0)

    first = SGD(0.1)
    halfway = run_numpy(weights, grads[:3], [0.1] * 3, 0.9, 0.0, opt=first)
    saved = first.state_dict()
    resumed = SGD(0.1)
    resumed.load_state_dict(saved)
    end = run_numpy(halfway, grads[3:], [0.1] * 3, 0.9, 0.0, opt=resumed)

    assert set(saved) == set(SHAPES) and all(isinstance(b, np.ndarray) for b in saved.values())
    for name in SHAPES:
        np.testing.assert_array_equal(end[name], straight[name])


def test_state_dict_is_a_copy():
    rng = np.random.default_rng(1)
    opt = SGD(0.1)
    opt.step(random_tensors(rng), random_tensors(rng))
    saved = opt.state_dict()
    before = {n: b.copy() for n, b in saved.items()}

    opt.step(random_tensors(rng), random_tensors(rng))

    for name in SHAPES:
        np.testing.assert_array_equal(saved[name], before[name])


def test_reset_makes_the_next_step_a_first_step():
    rng = np.random.default_rng(2)
    weights, g1, g2 = random_tensors(rng), random_tensors(rng), random_tensors(rng)
    opt = SGD(0.1)
    opt.step(weights, g1)

    opt.reset()
    after_reset = opt.step(weights, g2)

    assert opt.state_dict().keys() == SHAPES.keys()
    fresh = SGD(0.1).step(weights, g2)
    for name in SHAPES:
        np.testing.assert_array_equal(after_reset[name], fresh[name])


def test_step_leaves_its_inputs_alone():
    rng = np.random.default_rng(3)
    weights, grads = random_tensors(rng), random_tensors(rng)
    copies = {n: w.copy() for n, w in weights.items()}, {n: g.copy() for n, g in grads.items()}

    SGD(0.1, weight_decay=0.01).step(weights, grads)

    for name in SHAPES:
        np.testing.assert_array_equal(weights[name], copies[0][name])
        np.testing.assert_array_equal(grads[name], copies[1][name])


def test_mismatched_gradients_are_refused():
    rng = np.random.default_rng(4)
    weights, grads = random_tensors(rng), random_tensors(rng)

    with pytest.raises(EngineError, match=r"missing \['fc\.bias'\]"):
        SGD(0.1).step(weights, {"conv.weight": grads["conv.weight"]})
    with pytest.raises(EngineError, match=r"fc\.bias.*shape"):
        SGD(0.1).step(weights, {**grads, "fc.bias": np.zeros(6, np.float32)})


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": 0.1, "momentum": -0.1}, {"lr": 0.1, "weight_decay": -1.0}])
def test_bad_hyperparameters_are_refused(kwargs):
    with pytest.raises(EngineError, match="SGD needs"):
        SGD(**kwargs)


def test_a_bad_saved_state_is_refused():
    with pytest.raises(CheckpointError, match="delete the local checkpoint"):
        SGD(0.1).load_state_dict({"conv.weight": object()})
