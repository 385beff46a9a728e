"""The Evaluator against a direct PyTorch computation: the whole model run block by block on the
test images, each exit's branch applied where it sits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.data import transform
from toolkit.errors import ConfigError
from toolkit.evaluation import Evaluator
from toolkit.models import load_model

MODEL = "small_cnn+exits:1,2"
IMAGES = 300


def trained_tensors(model, stop_block: int) -> dict[str, np.ndarray]:
    """A round's global version: every branch and every block from ``stop_block`` on moved off
    its initial value (the blocks before it are frozen: a run never changes them)."""
    rng = np.random.default_rng(0)
    trained = (*(f"{name}." for name in model.block_names[stop_block:]), "exits.")
    return {
        name: (t.detach().numpy() + 0.3 * rng.standard_normal(t.shape)).astype(np.float32)
        for name, t in model.root.named_parameters()
        if name.startswith(trained)
    }


def direct(tensors: dict[str, np.ndarray], images: np.ndarray) -> dict[int, torch.Tensor]:
    """Each exit's logits, by position, from a fresh model holding ``tensors``."""
    model = load_model(MODEL)
    state = model.root.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in tensors.items()})
    model.root.load_state_dict(state)
    model.root.eval()
    out = {}
    with torch.no_grad():
        h = torch.from_numpy(transform(images))
        for i, (_, block) in enumerate(model.blocks):
            h = block(h)
            if i + 1 in model.branch_positions:
                out[i + 1] = model.branch_module(i + 1)(h)
        out[len(model.block_names)] = h
    return out


@pytest.mark.parametrize("stop_block", [0, 2, 3])
def test_every_exits_accuracy_and_loss_are_a_direct_computations(stop_block, fashion_test, one_torch_thread):
    model = load_model(MODEL)
    tensors = trained_tensors(model, stop_block)
    assert any(name.startswith("exits.1.") for name in tensors)  # a tap's branch trains too
    weights = (0.5, 1.0, 2.0)
    evaluator = Evaluator(model, stop_block, IMAGES, exit_weights=weights)

    m = evaluator.exit_metrics(tensors, logits=True)

    labels = torch.from_numpy(fashion_test.labels[:IMAGES].astype(np.int64))
    logits = direct(tensors, fashion_test.images[:IMAGES])
    assert list(m.accuracy) == list(m.loss) == [1, 2, 5]
    for position, z in logits.items():
        assert m.accuracy[position] == pytest.approx((z.argmax(1) == labels).double().mean().item(), abs=1e-12)
        assert m.loss[position] == pytest.approx(F.cross_entropy(z, labels).item(), rel=1e-5)
    total = sum(w * F.cross_entropy(logits[p], labels).item() for w, p in zip(weights, (1, 2, 5), strict=True))
    assert m.total_loss == pytest.approx(total, rel=1e-5)
    assert m.mean_accuracy == pytest.approx(sum(m.accuracy.values()) / 3)
    assert m.logits is not None and m.logits.shape == (IMAGES, 3, 10) and m.logits.dtype == np.float32
    np.testing.assert_allclose(m.logits[:, 1], logits[2].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(m.labels, labels.numpy())
    # the exit model's one accuracy is its final exit's
    assert evaluator.accuracy(tensors) == m.accuracy[5]
    # the chosen exits differ: an honest comparison, not three copies of one number
    assert len({round(a, 6) for a in m.accuracy.values()}) > 1


def test_logits_are_left_out_unless_asked_for(fashion_test):
    model = load_model(MODEL)
    m = Evaluator(model, 3, 50).exit_metrics(trained_tensors(model, 3))
    assert m.logits is None and m.labels is None
    assert m.total_loss == pytest.approx(sum(m.loss.values()))  # weights default to 1 each


def test_a_plain_model_has_no_exit_metrics_and_its_accuracy_is_unchanged(fashion_test):
    model = load_model("small_cnn")
    tensors = trained_tensors(model, 4)
    evaluator = Evaluator(model, 4, 100)
    with torch.no_grad():
        model.root.classifier.weight.copy_(torch.from_numpy(tensors["classifier.weight"]))
        model.root.classifier.bias.copy_(torch.from_numpy(tensors["classifier.bias"]))
        z = model.forward(torch.from_numpy(transform(fashion_test.images[:100])))
    expected = (z.argmax(1).numpy() == fashion_test.labels[:100]).mean()
    assert evaluator.accuracy(tensors) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ConfigError, match="has no exits"):
        evaluator.exit_metrics(tensors)


def test_exit_weights_must_be_one_per_exit():
    with pytest.raises(ConfigError, match="2 exit weights for 3 exits"):
        Evaluator(load_model(MODEL), 3, 10, exit_weights=(1.0, 1.0))
