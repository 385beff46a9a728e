"""The numpy engine: a linear head trained in numpy, the frozen part on ONNX Runtime inference.
Its gradients are ONNX Runtime training's; a round on it is a round on ort; and it runs where
ONNX Runtime has no training API (arm64's wheel), which a fresh interpreter refusing
``onnxruntime.training`` stands in for here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from device_runtime.bundle import Bundle
from device_runtime.codec import decode
from device_runtime.engines import open_engine
from device_runtime.errors import EngineError
from device_runtime.local_round import Task
from device_runtime.trainer import LocalTrainer
from toolkit.data import write_shard


@pytest.fixture
def head(small_cnn_bundle):
    return Bundle.load(small_cnn_bundle(engines=("numpy",)))


def test_gradients_and_outputs_equal_onnx_runtime_training(head, small_cnn_bundle, fashion_train):
    # Prepare: the same head on both engines, features of real images
    ort = open_engine(Bundle.load(small_cnn_bundle()), "ort")
    numpy_engine = open_engine(head, "numpy")
    from device_runtime.preprocess import prepare

    h = numpy_engine.features(prepare(fashion_train.images[:32], head.manifest.input_spec))
    labels = fashion_train.labels[:32]

    # Execute
    loss_np, grads_np = numpy_engine.gradients(h, labels)
    loss_ort, grads_ort = ort.gradients(
        ort.features(prepare(fashion_train.images[:32], head.manifest.input_spec)), labels
    )

    # Assert
    np.testing.assert_allclose(numpy_engine.forward(h), ort.forward(h), rtol=1e-5, atol=1e-6)
    assert loss_np == pytest.approx(loss_ort, rel=1e-6)
    assert set(grads_np) == set(grads_ort) == {t.name for t in head.manifest.trainable}
    for name in grads_np:
        np.testing.assert_allclose(grads_np[name], grads_ort[name], rtol=1e-4, atol=1e-7)


def test_a_round_on_numpy_ends_where_the_same_round_on_ort_ends(head, small_cnn_bundle, fashion_train, tmp_path):
    shard = write_shard(tmp_path / "s.npz", fashion_train.images[:300], fashion_train.labels[:300])
    task = Task(round=1, base_version=0, lr=0.05, local_epochs=2, batch_size=32, encoding="fp32", seed=3)
    base = decode(head.path("weights").read_bytes()).tensors
    ends = {}
    for name, bundle in (("numpy", head), ("ort", Bundle.load(small_cnn_bundle()))):
        result = LocalTrainer(bundle, shard, tmp_path / name, device_id="p").run_round(task, base)
        ends[name] = (result.train_loss, result.update)

    assert ends["numpy"][0] == pytest.approx(ends["ort"][0], rel=1e-5)
    for tensor in base:
        # 2 epochs of SGD with momentum amplify float32 rounding a little: well under the step's size
        np.testing.assert_allclose(
            ends["numpy"][1][tensor], ends["ort"][1][tensor], rtol=1e-4, atol=1e-6
        )  # the round's deltas


def test_it_trains_where_onnx_runtime_has_no_training_api(head, fashion_train, tmp_path):
    shard = write_shard(tmp_path / "s.npz", fashion_train.images[:100], fashion_train.labels[:100])
    script = f"""
import json, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch" or name.startswith("onnxruntime.training"):
            raise ImportError(name + " is not on this phone")
sys.meta_path.insert(0, Refuse())
from device_runtime.bundle import Bundle
from device_runtime.codec import decode
from device_runtime.local_round import Task
from device_runtime.trainer import LocalTrainer
bundle = Bundle.load({str(head.root)!r})
task = Task(round=1, base_version=0, lr=0.05, local_epochs=1, batch_size=32, encoding="int8", seed=0)
result = LocalTrainer(bundle, {str(shard)!r}, {str(tmp_path / "w")!r}, device_id="p").run_round(
    task, decode(bundle.path("weights").read_bytes()).tensors)
print(json.dumps({{"loss": result.train_loss, "steps": result.steps, "torch": "torch" in sys.modules,
                  "training": "onnxruntime.training" in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["steps"] > 0 and np.isfinite(out["loss"]) and not out["torch"] and not out["training"]


def test_anything_but_one_linear_head_is_refused(small_cnn_bundle):
    for bundle in (small_cnn_bundle(train_blocks=2), small_cnn_bundle(cut=3)):
        with pytest.raises(EngineError, match="no files for engine 'numpy'"):
            open_engine(Bundle.load(bundle), "numpy")
