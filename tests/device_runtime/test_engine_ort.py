"""The ort engine trains as eager PyTorch does: head only, last blocks + head (conv, BatchNorm
with running statistics, pooling), SplitFed from the edge's gradient, and early exits with the
weighted multi-exit loss; without torch, in a small process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle_helpers import edited_copy
from torch.func import functional_call

from device_runtime.bundle import Bundle
from device_runtime.engines import open_engine
from device_runtime.engines.ort import OrtEngine
from device_runtime.errors import EngineError
from device_runtime.manifest import DevicePlan
from device_runtime.optim import SGD
from exporters.bundle import export_bundle
from toolkit.data import LABEL_NAMES
from toolkit.models import SplittableModel, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 16


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, mobilenet, small_cnn):
    """ort bundles of blocks [0, cut) training [train_from, cut), exported on first use from the
    very models the tests compare with, by (model name, train_from, cut)."""
    made = {}
    models = {"mobilenet_v2": mobilenet, "small_cnn": small_cnn}

    def get(name: str, train_from: int, cut: int) -> Bundle:
        if (name, train_from, cut) not in made:
            out = tmp_path_factory.mktemp("bundle") / f"{name}-{train_from}-{cut}"
            plan = DevicePlan(cut=cut, train_from=train_from, engine="ort")
            export_bundle(models[name], plan, out, ("ort",), label_names=LABEL_NAMES)
            made[name, train_from, cut] = Bundle.load(out)
        return made[name, train_from, cut]

    return get


def batch(model: SplittableModel, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *model.input_shape, generator=g).numpy(), torch.randint(
        0, model.num_classes, (BATCH,), generator=g
    )


def ten_steps(engine: OrtEngine, part, h: np.ndarray, labels: torch.Tensor, edge=None):
    """Ten SGD steps (lr 0.01, momentum 0.9) by the engine + numpy SGD and by eager PyTorch on
    the same batch. With ``edge`` (SplitFed) the loss is the edge's cross-entropy and the phone
    trains from the edge's gradient at the cut. Returns both loss curves and final weights."""
    ref = {name: p.detach().clone().requires_grad_(True) for name, p in part.named_parameters()}
    torch_opt = torch.optim.SGD(list(ref.values()), lr=0.01, momentum=0.9)
    opt = SGD(0.01, momentum=0.9)
    ours, theirs = [], []
    for _ in range(10):
        out = functional_call(part, ref, (torch.from_numpy(h),))
        if edge is None:
            loss = F.cross_entropy(out, labels)
            engine_loss, grads = engine.gradients(h, labels.numpy())
        else:
            loss = F.cross_entropy(edge(out), labels)
            cut_activation = torch.from_numpy(engine.forward(h)).requires_grad_(True)
            edge_loss = F.cross_entropy(edge(cut_activation), labels)
            (grad_out,) = torch.autograd.grad(edge_loss, cut_activation)
            engine_loss, grads = edge_loss.item(), engine.backward_from(h, grad_out.numpy())
        for p, g in zip(ref.values(), torch.autograd.grad(loss, list(ref.values())), strict=True):
            p.grad = g
        torch_opt.step()
        engine.set_weights(opt.step(engine.get_weights(), grads))
        ours.append(engine_loss)
        theirs.append(float(loss.detach()))
    return np.array(ours), np.array(theirs), engine.get_weights(), {n: p.detach().numpy() for n, p in ref.items()}


PARITY = [
    pytest.param("mobilenet_v2", 20, 21, id="a-mobilenet-head"),
    pytest.param("mobilenet_v2", 17, 21, id="b-mobilenet-last-blocks-and-head"),
    pytest.param("mobilenet_v2", 14, 17, id="c-mobilenet-splitfed"),
    pytest.param("small_cnn", 1, 5, id="b-small_cnn"),
    pytest.param("small_cnn", 1, 3, id="c-small_cnn-splitfed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, train_from, cut", PARITY)
def test_ten_sgd_steps_track_pytorch(request, bundles, name, train_from, cut):
    # Prepare
    model = request.getfixturevalue("mobilenet" if name == "mobilenet_v2" else name)
    engine = OrtEngine(bundles(name, train_from, cut))
    x, labels = batch(model)
    part = model.part(train_from, cut)
    edge = model.part(cut, len(model.block_names)) if cut < len(model.block_names) else None

    # Execute
    h = engine.features(x)
    before = engine.get_weights()
    ours, theirs, weights, expected = ten_steps(engine, part, h, labels, edge)

    # Assert: the frozen part equals PyTorch's, the losses track it, and so do the weights
    with torch.no_grad():
        np.testing.assert_allclose(h, model.part(0, train_from)(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(ours - theirs) / np.abs(theirs)) < 1e-4, (ours, theirs)
    assert all(not np.array_equal(weights[key], before[key]) for key in before)  # every tensor trained
    for key in expected:
        # The two trajectories agree to within 1% of how far the weights moved: kernels that sum
        # in another order differ by ~1e-4 of it after ten momentum steps (more on some CPUs
        # than on others), a wrong gradient by all of it.
        moved = np.abs(expected[key] - before[key]).max()
        apart = np.abs(weights[key] - expected[key]).max()
        assert apart <= 0.01 * moved, (key, apart, moved)


@pytest.mark.parametrize("name, train_from, cut", [("mobilenet_v2", 14, 17), ("small_cnn", 1, 3)])
def test_backward_from_is_the_vector_jacobian_product(request, bundles, name, train_from, cut):
    model = request.getfixturevalue("mobilenet" if name == "mobilenet_v2" else name)
    engine = OrtEngine(bundles(name, train_from, cut))
    x, _ = batch(model, seed=1)
    h = engine.features(x)
    part = model.part(train_from, cut)
    params = dict(part.named_parameters())
    out = part(torch.from_numpy(h))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    expected = dict(zip(params, torch.autograd.grad((out * grad_out).sum(), list(params.values())), strict=True))

    grads = engine.backward_from(h, grad_out.numpy())

    assert grads.keys() == expected.keys()
    for key, g in expected.items():
        scale = float(g.abs().max())
        np.testing.assert_allclose(grads[key], g.numpy(), rtol=1e-4, atol=1e-5 * scale, err_msg=key)


def test_forward_uses_the_current_weights(bundles, small_cnn):
    engine = OrtEngine(bundles("small_cnn", 1, 5))
    x, _ = batch(small_cnn)
    h = engine.features(x)
    with torch.no_grad():
        np.testing.assert_allclose(
            engine.forward(h), small_cnn.part(1, 5)(torch.from_numpy(h)).numpy(), rtol=1e-5, atol=1e-5
        )
    weights = engine.get_weights()

    engine.set_weights({**weights, "classifier.weight": 0 * weights["classifier.weight"]})

    np.testing.assert_allclose(engine.forward(h), np.broadcast_to(weights["classifier.bias"], (BATCH, 10)), atol=1e-6)


def test_gradients_start_from_zero_at_every_call(bundles, small_cnn):
    engine = OrtEngine(bundles("small_cnn", 1, 5))
    x, labels = batch(small_cnn)
    h = engine.features(x)

    loss1, first = engine.gradients(h, labels.numpy())
    loss2, second = engine.gradients(h, labels.numpy())

    assert loss1 == loss2
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_get_weights_returns_copies(bundles):
    engine = OrtEngine(bundles("small_cnn", 1, 5))
    weights = engine.get_weights()

    weights["classifier.bias"][:] = 42.0

    assert not np.any(engine.get_weights()["classifier.bias"] == 42.0)


def test_nothing_frozen_means_features_are_the_input(bundles, small_cnn):
    bundle = bundles("small_cnn", 0, 5)
    engine = open_engine(bundle)
    x, _ = batch(small_cnn)

    assert isinstance(engine, OrtEngine) and not bundle.has("frozen.onnx")
    np.testing.assert_array_equal(engine.features(x), x)


def test_each_mode_refuses_the_other_ones_call(bundles, small_cnn):
    classify, splitfed = OrtEngine(bundles("small_cnn", 1, 5)), OrtEngine(bundles("small_cnn", 1, 3))
    h = classify.features(batch(small_cnn)[0])

    with pytest.raises(EngineError, match="call gradients with labels"):
        classify.backward_from(h, np.zeros((BATCH, 10), np.float32))
    with pytest.raises(EngineError, match=r"SplitFed.*call backward_from"):
        splitfed.gradients(h, np.zeros(BATCH, np.int64))


def test_bad_weights_are_refused(bundles):
    engine = OrtEngine(bundles("small_cnn", 1, 5))
    weights = engine.get_weights()

    with pytest.raises(EngineError, match=r"missing \['classifier\.bias'\]"):
        engine.set_weights({k: v for k, v in weights.items() if k != "classifier.bias"})
    with pytest.raises(EngineError, match="unknown \\['extra'\\]"):
        engine.set_weights({**weights, "extra": np.zeros(1, np.float32)})
    with pytest.raises(EngineError, match=r"'classifier\.bias' has shape \(3,\)"):
        engine.set_weights({**weights, "classifier.bias": np.zeros(3, np.float32)})


def test_inputs_of_the_wrong_shape_are_refused(bundles):
    engine = OrtEngine(bundles("small_cnn", 1, 5))

    with pytest.raises(EngineError, match=r"(?s)failed running the frozen part.*check the input's shape"):
        engine.features(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(EngineError, match="failed running the training step"):
        engine.gradients(np.zeros((2, 3, 16, 16), np.float32), np.zeros(2, np.int64))


def test_a_training_model_ort_cannot_read_is_refused(tmp_path, bundles):
    broken = edited_copy(
        bundles("small_cnn", 1, 5).root, tmp_path / "b", files={"ort.training_model": b"not an onnx model"}
    )

    with pytest.raises(EngineError, match=r"(?s)ONNX Runtime cannot load bundle.*re-export"):
        OrtEngine(broken)


def test_a_checkpoint_of_another_part_is_refused(tmp_path, bundles):
    # ORT itself loads it and would fail only at the first step
    data = bundles("small_cnn", 4, 5).path("ort.checkpoint").read_bytes()
    bundle = edited_copy(bundles("small_cnn", 1, 5).root, tmp_path / "b", files={"ort.checkpoint": data})

    with pytest.raises(EngineError, match=r"lacks trainable tensors \['features\.1\.0\.weight'"):
        OrtEngine(bundle)


# -- early exits -----------------------------------------------------------------------------------

EXITS = "small_cnn+exits:1,2"


@pytest.fixture(scope="module")
def exit_model():
    torch.manual_seed(0)
    return load_model(EXITS)


@pytest.fixture(scope="module")
def exit_bundles(tmp_path_factory, exit_model):
    """ort bundles of small_cnn+exits:1,2 stopping at exit ``cut``, training [train_from, cut) and
    every held branch, with the loss weights ``weights``, by (train_from, cut, weights)."""
    made = {}

    def get(train_from: int, cut: int, weights: tuple[float, ...]) -> Bundle:
        if (train_from, cut, weights) not in made:
            out = tmp_path_factory.mktemp("exit_bundle") / "b"
            plan = DevicePlan(cut=cut, train_from=train_from, exits=exit_model.held_exits(cut), exit_weights=weights)
            export_bundle(exit_model, plan, out, ("ort",), label_names=LABEL_NAMES)
            made[train_from, cut, weights] = Bundle.load(out)
        return made[train_from, cut, weights]

    return get


@pytest.mark.parametrize(
    "train_from, cut, weights",
    [
        pytest.param(2, 5, (1.0, 1.0, 1.0), id="final-exit-default-weights"),
        pytest.param(4, 5, (0.25, 0.0, 2.0), id="final-exit-classifier-and-branches-other-weights"),
        pytest.param(0, 2, (3.0, 0.5), id="early-exit-everything-trains"),
        pytest.param(2, 2, (1.0, 1.0), id="early-exit-branches-only"),
    ],
)
def test_exit_loss_and_gradients_are_the_weighted_multi_exit_cross_entropy(
    exit_bundles, exit_model, train_from, cut, weights
):
    # Prepare
    engine = OrtEngine(exit_bundles(train_from, cut, weights))
    x, labels = batch(exit_model, seed=3)
    part = exit_model.trainable_part(train_from, cut)
    params = dict(part.named_parameters())

    # Execute
    h = engine.features(x)
    loss, grads = engine.gradients(h, labels.numpy())

    # Assert: sum_e w_e * mean CE(exit e), and PyTorch's gradients of it for every held branch and block
    with torch.no_grad():  # the frozen rows (the images themselves when nothing is frozen)
        rows = exit_model.frozen_part(train_from)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(h.reshape(len(h), -1), rows, rtol=1e-5, atol=1e-5)
    logits = part(torch.from_numpy(h))
    expected = sum(w * F.cross_entropy(logits[:, e], labels) for e, w in enumerate(weights))
    np.testing.assert_allclose(engine.forward(h), logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    assert grads.keys() == params.keys() and {n.split(".")[1] for n in grads if n.startswith("exits.")} == {
        str(p) for p in exit_model.held_exits(cut) if p < 5
    }
    expected_grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), expected_grads, strict=True):
        g = torch.zeros_like(p) if g is None else g  # an exit of weight 0 gets no gradient at all
        scale = max(float(g.abs().max()), 1e-3)
        np.testing.assert_allclose(grads[name], g.numpy(), rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_exit_forward_gives_every_held_exit_and_uses_the_current_weights(exit_bundles, exit_model):
    engine = OrtEngine(exit_bundles(2, 5, (1.0, 1.0, 1.0)))
    h = engine.features(batch(exit_model)[0])
    weights = engine.get_weights()

    engine.set_weights({**weights, "exits.2.4.weight": 0 * weights["exits.2.4.weight"]})
    logits = engine.forward(h)

    assert logits.shape == (BATCH, 3, 10)
    np.testing.assert_allclose(logits[:, 1], np.broadcast_to(weights["exits.2.4.bias"], (BATCH, 10)), atol=1e-6)


def test_exit_bundles_refuse_backward_from_and_labels_outside_the_classes(exit_bundles, exit_model):
    engine = OrtEngine(exit_bundles(2, 5, (1.0, 1.0, 1.0)))
    h = engine.features(batch(exit_model)[0])

    with pytest.raises(EngineError, match="call gradients with labels"):
        engine.backward_from(h, np.zeros((BATCH, 3, 10), np.float32))
    with pytest.raises(EngineError, match=r"labels must be one integer in 0\.\.9 per sample"):
        engine.gradients(h, np.full(BATCH, 10))


# Runs in a child process, as a phone would: optionally with torch made unimportable, then one
# features pass and ten training steps on a bundle; reports peak RSS and what got imported.
PHONE = """
import importlib.abc, json, re, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(name + " is not installed on a phone")
        return None

if {block_torch!r}:
    sys.meta_path.insert(0, NoTorch())

import numpy as np
from device_runtime.bundle import Bundle
from device_runtime.engines import open_engine
from device_runtime.optim import SGD

engine = open_engine(Bundle.load({root!r}))
rng = np.random.default_rng(0)
h = engine.features(rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
opt = SGD(0.01)
losses = []
for step in range(10):
    loss, grads = engine.gradients(h, rng.integers(0, 10, 32))
    engine.set_weights(opt.step(engine.get_weights(), grads))
    losses.append(loss)
print(json.dumps({{
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest)
    "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024,
    "torch_loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
    "losses": losses,
}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("block_torch", [True, False], ids=["phone-without-torch", "emulated-phone-beside-torch"])
def test_trains_the_mobilenet_head_without_torch_in_a_small_process(bundles, block_torch):
    bundle = bundles("mobilenet_v2", 20, 21)

    run = subprocess.run(
        [sys.executable, "-c", PHONE.format(block_torch=block_torch, root=str(bundle.root))],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["torch_loaded"] == []
    assert all(np.isfinite(report["losses"]))
    assert report["peak_rss_mb"] <= 150, report


def test_the_torch_blocker_really_blocks():
    code = PHONE.split("import numpy")[0].format(block_torch=True, root="") + "import torch\n"

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert run.returncode == 1 and "torch is not installed on a phone" in run.stderr
