"""The Engine protocol's contract, held by every engine on the same bundle (small_cnn's head,
exported for all three): what each method takes and gives, that weights round-trip, that a step
along the gradient lowers the loss, and that every engine computes the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_helpers import edited_copy

from device_runtime.bundle import Bundle
from device_runtime.engines import open_engine
from device_runtime.errors import EngineError
from device_runtime.preprocess import prepare

ENGINES = ("ort", "executorch", "numpy")


@pytest.fixture(scope="module")
def bundle(small_cnn_bundle):
    return Bundle.load(small_cnn_bundle(engines=ENGINES))


@pytest.fixture(scope="module")
def batch(bundle, fashion_train):
    return prepare(fashion_train.images[:24], bundle.manifest.input_spec), fashion_train.labels[:24].astype(np.int64)


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_keeps_the_contract(name, bundle, batch):
    engine = open_engine(bundle, name)
    x, labels = batch
    shapes = {t.name: tuple(t.shape) for t in bundle.manifest.trainable}

    h = engine.features(x)
    logits = engine.forward(h)
    loss, grads = engine.gradients(h, labels)

    assert engine.name == name
    assert h.dtype == np.float32 and len(h) == len(x)
    assert logits.shape == (len(x), len(bundle.manifest.label_names))
    assert np.isfinite(loss) and loss > 0
    assert {k: g.shape for k, g in grads.items()} == shapes and all(np.isfinite(g).all() for g in grads.values())
    weights = engine.get_weights()
    assert {k: w.shape for k, w in weights.items()} == shapes
    # a small step against the gradient lowers the loss; set_weights is what the trainer uses
    engine.set_weights({k: w - 0.05 * grads[k] for k, w in weights.items()})
    assert engine.gradients(h, labels)[0] < loss
    engine.set_weights(weights)
    np.testing.assert_array_equal(engine.get_weights()[next(iter(shapes))], weights[next(iter(shapes))])
    with pytest.raises(EngineError, match=r"exactly the bundle's trainable tensors|exactly the trainable tensors"):
        engine.set_weights({})


def test_every_engine_computes_the_same_numbers(bundle, batch):
    x, labels = batch
    results = {}
    for name in ENGINES:
        engine = open_engine(bundle, name)
        h = engine.features(x)
        results[name] = (h, engine.forward(h), *engine.gradients(h, labels))
    h, logits, loss, grads = results["ort"]
    for name in ENGINES[1:]:
        other_h, other_logits, other_loss, other_grads = results[name]
        np.testing.assert_allclose(other_h, h, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(other_logits, logits, rtol=1e-4, atol=1e-5, err_msg=name)
        assert other_loss == pytest.approx(loss, rel=1e-5), name
        for k in grads:
            np.testing.assert_allclose(other_grads[k], grads[k], rtol=1e-3, atol=1e-6, err_msg=f"{name} {k}")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("executorch", r"holds early exits \[5\]: the executorch training program .* --engine ort"),
        ("numpy", r"holds early exits \[5\]: .*ort engine only"),
    ],
)
def test_only_ort_opens_an_early_exit_bundle(name, message, bundle, tmp_path):
    # Prepare: the same files, the plan an early-exit one (a lone linear layer then is a branch, no numpy head)
    from device_runtime.engines.executorch import ExecuTorchEngine
    from device_runtime.engines.linear import NumpyEngine

    def with_exits(manifest: dict) -> None:
        manifest["plan"].update(exits=[5], exit_weights=[1.0])

    exits = edited_copy(bundle.root, tmp_path / "exits", edit=with_exits)
    engine = {"executorch": ExecuTorchEngine, "numpy": NumpyEngine}[name]

    # Execute, Assert
    assert exits.manifest.has_exits and exits.manifest.engines == ("ort", "executorch")
    with pytest.raises(EngineError, match=message):
        engine(exits)
