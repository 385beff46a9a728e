"""The executorch engine on real exported bundles: features, forward, gradients and weights match
eager PyTorch; training with the shared numpy SGD tracks torch.optim.SGD; and its limits (no
SplitFed, no runtime installed, the runtime's own torch import) fail with EngineError."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle_helpers import edited_copy, set_file

from device_runtime.bundle import Bundle
from device_runtime.engines import open_engine
from device_runtime.engines.executorch import ExecuTorchEngine
from device_runtime.errors import EngineError
from device_runtime.manifest import DevicePlan
from device_runtime.optim import SGD
from exporters.bundle import export_bundle
from exporters.executorch import MAX_BATCH, export_executorch_training
from toolkit.data import LABEL_NAMES
from toolkit.models import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cnn_bundle(small_cnn_bundle):
    """small_cnn's head as the exporter writes it (blocks 0-3 frozen), for every engine: the
    bundle test_engine_contract.py takes too, so a session exports it once."""
    bundle = Bundle.load(small_cnn_bundle(engines=("ort", "executorch", "numpy")))
    assert bundle.manifest.plan.train_from == 4 and bundle.has("executorch.frozen")
    return bundle


@pytest.fixture(scope="module")
def cnn_engine(cnn_bundle):
    return open_engine(cnn_bundle, "executorch")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _eager(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("batch", [1, 7, 2 * MAX_BATCH + 7])  # the last one in three program calls
def test_features_match_eager_in_chunks(small_cnn, cnn_engine, batch):
    x = _images(batch, seed=batch)
    np.testing.assert_allclose(cnn_engine.features(x), _eager(small_cnn.part(0, 4), x), rtol=1e-5, atol=1e-5)


def test_forward_and_gradients_match_eager(small_cnn, cnn_engine):
    # Prepare: a batch of 100 > the training program's 64, so two chunks
    h = _eager(small_cnn.part(0, 4), _images(100, seed=3))
    labels = np.random.default_rng(3).integers(0, 10, 100)
    head = copy.deepcopy(small_cnn.part(4, 5))
    cnn_engine.set_weights({n: p.detach().numpy() for n, p in head.named_parameters()})
    # Execute
    logits = cnn_engine.forward(h)
    loss, grads = cnn_engine.gradients(h, labels)
    # Assert
    expected_logits = head(torch.from_numpy(h))
    expected_loss = F.cross_entropy(expected_logits, torch.from_numpy(labels))
    expected_loss.backward()
    np.testing.assert_allclose(logits, expected_logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, expected_loss.item(), rtol=1e-5)
    assert sorted(grads) == ["classifier.bias", "classifier.weight"]
    for name, p in head.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_set_weights_changes_what_the_program_computes(cnn_engine):
    h = np.ones((2, 32), np.float32)
    weights = {
        "classifier.weight": np.full((10, 32), 0.5, np.float32),
        "classifier.bias": np.arange(10, dtype=np.float32),
    }
    cnn_engine.set_weights(weights)
    np.testing.assert_allclose(cnn_engine.forward(h), np.tile(16.0 + np.arange(10), (2, 1)), rtol=1e-6)
    got = cnn_engine.get_weights()
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w)
    got["classifier.bias"][:] = 0  # a copy: the program keeps its weights
    np.testing.assert_array_equal(cnn_engine.get_weights()["classifier.bias"], weights["classifier.bias"])


@pytest.mark.slow
def test_mobilenet_head_trains_like_eager_with_shared_sgd(tmp_path):
    # Prepare: the real head on 1280-d features, ten steps of SGD(lr 0.01, momentum 0.9). The
    # exporter's ort bundle of the head, plus the head's ExecuTorch training program: the whole
    # executorch export would lower the 20-block backbone too (~30 s), which this test never runs.
    model = load_model("mobilenet_v2")
    root = tmp_path / "bundle"
    export_bundle(model, DevicePlan(cut=21, train_from=20), root, ("ort",), label_names=LABEL_NAMES)
    with torch.no_grad():
        h = model.part(0, 20).eval()(torch.zeros(1, *model.input_shape))
    export_executorch_training(model.part(20, 21), h, root / "executorch" / "train.pte")
    set_file(root, "executorch.train", rel="executorch/train.pte")
    bundle = Bundle.load(root)
    engine = ExecuTorchEngine(bundle)
    head = copy.deepcopy(model.part(20, 21)).eval()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((10, 32, 1280)).astype(np.float32)
    ys = rng.integers(0, 10, (10, 32))
    # Execute
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    expected = []
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        loss = F.cross_entropy(head(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        expected.append(loss.item())
    sgd, weights, actual = SGD(0.01, momentum=0.9), engine.get_weights(), []
    for x, y in zip(xs, ys, strict=True):
        loss, grads = engine.gradients(x, y)
        weights = sgd.step(weights, grads)
        engine.set_weights(weights)
        actual.append(loss)
    # Assert
    np.testing.assert_allclose(actual, expected, rtol=1e-4)
    for name, p in head.named_parameters():
        np.testing.assert_allclose(engine.get_weights()[name], p.detach().numpy(), atol=1e-5)


def test_no_frozen_file_means_identity_features(cnn_bundle, tmp_path):
    engine = ExecuTorchEngine(
        edited_copy(cnn_bundle.root, tmp_path / "b", edit=lambda d: d["files"].pop("executorch.frozen"))
    )
    h = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_array_equal(engine.features(h), h)


# -- errors --------------------------------------------------------------------------------------
def test_splitfed_backward_is_refused(cnn_engine):
    with pytest.raises(EngineError, match="--engine ort"):
        cnn_engine.backward_from(np.zeros((1, 32), np.float32), np.zeros((1, 10), np.float32))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: e.features(np.zeros((2, 3, 28, 28), np.float32)), r"\(batch, 3, 32, 32\)"),
        (lambda e: e.forward(np.zeros((2, 31), np.float32)), r"\(batch, 32\)"),
        (lambda e: e.gradients(np.zeros((2, 32), np.float32), np.zeros(3)), "one integer per sample"),
        (lambda e: e.set_weights({"classifier.weight": np.zeros((10, 32), np.float32)}), "exactly the trainable"),
        (lambda e: e.set_weights({"classifier.weight": np.zeros((32, 10)), "classifier.bias": np.zeros(10)}), "shape"),
    ],
)
def test_bad_inputs_are_engine_errors(cnn_engine, call, match):
    with pytest.raises(EngineError, match=match):
        call(cnn_engine)


def test_manifest_disagreeing_with_program_is_refused(cnn_bundle, tmp_path):
    def drop_bias(data):
        data["trainable"] = [t for t in data["trainable"] if t["name"] != "classifier.bias"]
        data["files"].pop("weights")  # else the loader refuses it first: the weights carry the bias

    with pytest.raises(EngineError, match="re-export the bundle"):
        ExecuTorchEngine(edited_copy(cnn_bundle.root, tmp_path / "b", edit=drop_bias))


def _run_blocked(blocked: str, code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter where importing ``blocked`` (or its submodules) fails."""
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == {blocked!r} or name.startswith({blocked!r} + "."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        """
    ) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_engine_module_imports_without_torch():
    result = _run_blocked("torch", "import device_runtime.engines.executorch; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_runtime_bindings_import_torch_so_the_engine_is_host_only(cnn_bundle):
    # ExecuTorch's Python runtime bindings link libtorch and import torch themselves: without
    # torch they cannot load, and the engine says what to do.
    result = _run_blocked(
        "torch",
        f"""
        from device_runtime.bundle import Bundle
        from device_runtime.engines.executorch import ExecuTorchEngine
        from device_runtime.errors import EngineError
        try:
            import executorch.extension.pybindings.portable_lib
        except ImportError as exc:
            print("bindings:", exc)
        try:
            ExecuTorchEngine(Bundle.load({str(cnn_bundle.root)!r}))
        except EngineError as exc:
            print("engine:", exc)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "bindings: blocked: torch" in result.stdout
    assert "pip install executorch==1.5.1, or use --engine ort" in result.stdout


def test_missing_executorch_is_an_engine_error(cnn_bundle):
    result = _run_blocked(
        "executorch",
        f"""
        from device_runtime.bundle import Bundle
        from device_runtime.engines.executorch import ExecuTorchEngine
        from device_runtime.errors import EngineError
        try:
            ExecuTorchEngine(Bundle.load({str(cnn_bundle.root)!r}))
        except EngineError as exc:
            print(exc)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install executorch==1.5.1, or use --engine ort" in result.stdout
