import json
import subprocess
import sys
import time

import numpy as np
import pytest

from device_runtime.bundle import Bundle
from device_runtime.checkpoint import load_checkpoint
from device_runtime.codec import decode
from device_runtime.engines import open_engine
from device_runtime.errors import (
    BundleError,
    CheckpointError,
    FedkitError,
    InternalError,
    ProtocolError,
)
from device_runtime.local_round import CHECKPOINT, Task
from device_runtime.manifest import DevicePlan
from device_runtime.trainer import LocalTrainer
from exporters.bundle import export_bundle
from toolkit.data import LABEL_NAMES, write_shard
from toolkit.models import load_model

TASK = Task(round=0, base_version=0, lr=0.05, local_epochs=1, batch_size=16, encoding="fp32", seed=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # small_cnn with its last conv block, pool and head training, the first two blocks frozen
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(
        load_model("small_cnn"), DevicePlan(cut=5, train_from=2, batch_size=16), out, ("ort",), label_names=LABEL_NAMES
    )
    return Bundle.load(out)


@pytest.fixture(scope="module")
def exit_bundle(tmp_path_factory):
    # small_cnn with exits after blocks 0 and 1, stopping at the final one: the last conv block,
    # pool, the classifier and both branches (on the frozen blocks' taps) train
    out = tmp_path_factory.mktemp("exit_bundle") / "b"
    model = load_model("small_cnn+exits:1,2")
    plan = DevicePlan(cut=5, train_from=2, batch_size=16, exits=(1, 2, 5), exit_weights=(1.0, 1.0, 1.0))
    export_bundle(model, plan, out, ("ort",), label_names=LABEL_NAMES)
    return Bundle.load(out)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, fashion_train):
    return write_shard(
        tmp_path_factory.mktemp("shard") / "shard.npz", fashion_train.images[:240], fashion_train.labels[:240]
    )


def base_weights(bundle):
    return decode(bundle.path("weights").read_bytes()).tensors


def trainer(bundle, shard, workdir, **kw):
    return LocalTrainer(bundle, shard, workdir, **kw)


class CountingEngine:
    """The real ort engine, counting how often the frozen part and the gradients run."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = {"features": 0, "gradients": 0}

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if name in self.calls:

            def counted(*args):
                self.calls[name] += 1
                return attr(*args)

            return counted
        return attr


# -- a round -------------------------------------------------------------------------------


def test_round_returns_the_update_and_its_metrics(bundle, shard, tmp_path):
    base = base_weights(bundle)

    result = trainer(bundle, shard, tmp_path).run_round(TASK, base)

    assert result.update.keys() == {t.name for t in bundle.manifest.trainable}
    for name, delta in result.update.items():
        assert delta.shape == base[name].shape and delta.dtype == np.float32
        assert np.abs(delta).max() > 0, name
    assert result.num_samples == 216 and result.steps == 14  # 10% held out; ceil(216 / 16)
    assert np.isfinite(result.train_loss) and 0 <= result.eval_accuracy <= 1 and np.isfinite(result.eval_loss)
    assert result.feature_seconds > 0 and result.train_seconds > 0 and not result.resumed


def test_rounds_lower_the_loss(bundle, shard, tmp_path):
    weights = base_weights(bundle)
    t = trainer(bundle, shard, tmp_path, holdout_fraction=0.0)
    losses = []
    for r in range(3):
        task = Task(round=r, base_version=r, lr=0.05, local_epochs=1, batch_size=16, encoding="fp32", seed=0)
        result = t.run_round(task, weights)
        weights = {k: weights[k] + result.update[k] for k in weights}
        losses.append(result.train_loss)

    assert losses[2] < losses[0]
    assert result.eval_accuracy is None and result.num_samples == 240


def test_rounds_on_an_exit_bundle_lower_the_multi_exit_loss_and_update_every_branch(exit_bundle, shard, tmp_path):
    # Prepare
    weights = base_weights(exit_bundle)
    t = trainer(exit_bundle, shard, tmp_path, holdout_fraction=0.25)
    losses, updates = [], []

    # Execute
    for r in range(3):
        task = Task(round=r, base_version=r, lr=0.05, local_epochs=1, batch_size=16, encoding="fp32", seed=0)
        result = t.run_round(task, weights)
        weights = {k: weights[k] + result.update[k] for k in weights}
        losses.append(result.train_loss)
        updates.append(result.update)

    # Assert: the loss falls; every tensor, each branch's among them, moves; the local evaluation is the deepest exit's
    assert losses[2] < losses[0]
    branches = {t.name for t in exit_bundle.manifest.trainable if t.name.startswith("exits.")}
    assert {n.split(".")[1] for n in branches} == {"1", "2"} and branches <= updates[0].keys()
    assert all(np.abs(u[n]).max() > 0 for u in updates for n in u)
    engine = open_engine(exit_bundle)
    engine.set_weights(weights)
    logits = engine.forward(t.features()[t.eval_index]).astype(np.float64)
    assert logits.shape == (60, 3, 10)
    final, y = logits[:, -1], t.labels[t.eval_index]
    log_p = final - final.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    assert result.eval_loss == pytest.approx(-log_p[np.arange(60), y].mean(), rel=1e-5)
    assert result.eval_accuracy == pytest.approx((final.argmax(axis=1) == y).mean())


def test_training_is_reproducible_and_seeded_per_device_and_round(bundle, shard, tmp_path):
    base = base_weights(bundle)

    def update(workdir, device_id="a", **task):
        task = Task(**{**TASK.to_dict(), **task})
        return trainer(bundle, shard, tmp_path / workdir, device_id=device_id).run_round(task, base).update

    first = update("1")
    again = update("2")
    other_device = update("3", device_id="b")
    other_seed = update("4", seed=1)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[n], other_device[n]) for n in first)
    assert any(not np.array_equal(first[n], other_seed[n]) for n in first)


def test_features_are_computed_once_per_bundle_and_shard(bundle, shard, tmp_path):
    base = base_weights(bundle)
    first = CountingEngine(open_engine(bundle))
    trainer(bundle, shard, tmp_path, engine=first).run_round(TASK, base)
    later = CountingEngine(open_engine(bundle))
    next_round = Task(**{**TASK.to_dict(), "round": 1})

    result = trainer(bundle, shard, tmp_path, engine=later).run_round(next_round, base)

    assert first.calls["features"] > 0 and later.calls["features"] == 0 and later.calls["gradients"] == result.steps
    assert len(list(tmp_path.glob(f"features-{bundle.bundle_hash[:16]}-*.npy"))) == 1


def test_a_phone_fed_the_global_blocks_trains_as_if_its_bundle_were_exported_from_the_global_model(shard, tmp_path):
    # Prepare: a run where deeper phones train small_cnn from block 1; this phone trains from 2.
    # The global model has moved block 1 away from the exported weights.
    import torch

    plan = DevicePlan(cut=5, train_from=2, batch_size=16)
    exported = load_model("small_cnn")
    export_bundle(exported, plan, tmp_path / "fed", ("ort",), label_names=LABEL_NAMES, fed_from=1)
    fed_bundle = Bundle.load(tmp_path / "fed")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in exported.part(1, 2).named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    export_bundle(exported, plan, tmp_path / "global", ("ort",), label_names=LABEL_NAMES)
    global_bundle = Bundle.load(tmp_path / "global")
    global_weights = {n: p.detach().numpy().copy() for n, p in exported.root.named_parameters()}

    # Execute
    fed = trainer(fed_bundle, shard, tmp_path / "a").run_round(TASK, global_weights)
    fresh = trainer(global_bundle, shard, tmp_path / "b").run_round(TASK, global_weights)
    stale = trainer(fed_bundle, shard, tmp_path / "c").run_round(TASK, {**base_weights(fed_bundle)})

    # Verify: the same update as a bundle of the global model, unlike one on the exported features
    for name in fresh.update:
        np.testing.assert_allclose(fed.update[name], fresh.update[name], rtol=1e-4, atol=1e-6)
    assert max(np.abs(stale.update[n] - fresh.update[n]).max() for n in fresh.update) > 1e-3


def test_a_damaged_feature_cache_is_recomputed(bundle, shard, tmp_path):
    base = base_weights(bundle)
    expected = trainer(bundle, shard, tmp_path / "clean").run_round(TASK, base).update
    trainer(bundle, shard, tmp_path).features()
    (cache,) = tmp_path.glob("features-*.npy")
    cache.write_bytes(cache.read_bytes()[:100])
    (tmp_path / "features-0123456789abcdef-0123456789abcdef.npy").write_bytes(b"an older bundle's cache")
    (tmp_path / f".{cache.name}.999.tmp").write_bytes(b"a write cut short by a kill")
    engine = CountingEngine(open_engine(bundle))

    update = trainer(bundle, shard, tmp_path, engine=engine).run_round(TASK, base).update

    assert engine.calls["features"] > 0
    assert [p.name for p in tmp_path.glob("*features-*")] == [cache.name]
    for name in expected:
        np.testing.assert_array_equal(update[name], expected[name])


def test_the_holdout_is_a_fixed_disjoint_slice(bundle, shard, tmp_path):
    a = trainer(bundle, shard, tmp_path, holdout_fraction=0.25)
    b = trainer(bundle, shard, tmp_path, holdout_fraction=0.25)

    assert len(a.eval_index) == 60 and len(a.train_index) == 180
    np.testing.assert_array_equal(a.eval_index, b.eval_index)
    assert not set(a.eval_index) & set(a.train_index)


# -- the encoded update and checkpoints ----------------------------------------------------


def test_encoded_update_decodes_to_the_update(bundle, shard, tmp_path):
    t = trainer(bundle, shard, tmp_path, device_id="phone-7")
    task = Task(**{**TASK.to_dict(), "round": 3, "base_version": 2})
    result = t.run_round(task, base_weights(bundle))

    encoded = t.encode_update(task, result)

    update = decode(encoded.payload)
    assert (update.header.device_id, update.header.round, update.header.base_version) == ("phone-7", 3, 2)
    assert update.header.num_samples == 216 and update.header.kind == "delta"
    for name, delta in result.update.items():
        np.testing.assert_array_equal(update.tensors[name], delta)
    assert encoded.idempotency_key.startswith("phone-7:3:")


def test_layered_encoding_gives_each_tensor_its_own_bits(bundle, shard, tmp_path):
    t = trainer(bundle, shard, tmp_path)
    task = Task(**{**TASK.to_dict(), "encoding": "layered:6"})
    result = t.run_round(task, base_weights(bundle))

    update = decode(t.encode_update(task, result).payload)

    assert update.tensors.keys() == result.update.keys()
    for name, delta in result.update.items():
        assert np.abs(update.tensors[name] - delta).max() <= np.abs(delta).max() / 2


def test_a_finished_round_is_handed_out_again_not_retrained(bundle, shard, tmp_path):
    base = base_weights(bundle)
    task = Task(**{**TASK.to_dict(), "encoding": "int8"})
    t = trainer(bundle, shard, tmp_path)
    first = t.encode_update(task, t.run_round(task, base))
    engine = CountingEngine(open_engine(bundle))
    restarted = trainer(bundle, shard, tmp_path, engine=engine)

    result = restarted.run_round(task, base)
    again = restarted.encode_update(task, result)

    assert result.resumed and engine.calls == {"features": 0, "gradients": 0}
    assert again == first


def test_error_feedback_is_carried_to_the_next_round_through_the_checkpoint(bundle, shard, tmp_path):
    base = base_weights(bundle)
    task = Task(**{**TASK.to_dict(), "encoding": "sign1"})
    t = trainer(bundle, shard, tmp_path)
    t.encode_update(task, t.run_round(task, base))
    residuals = t.error_feedback.state_dict()

    restarted = trainer(bundle, shard, tmp_path)

    assert json.dumps(_shapes(restarted.error_feedback.state_dict())) == json.dumps(_shapes(residuals))
    flat_before, flat_after = _arrays(residuals), _arrays(restarted.error_feedback.state_dict())
    assert flat_before and any(np.abs(a).max() > 0 for a in flat_before)
    for a, b in zip(flat_before, flat_after, strict=True):
        np.testing.assert_array_equal(a, b)


def _arrays(tree):
    if isinstance(tree, dict):
        return [a for k in sorted(tree) for a in _arrays(tree[k])]
    return [tree] if isinstance(tree, np.ndarray) else []


def _shapes(tree):
    if isinstance(tree, dict):
        return {k: _shapes(v) for k, v in sorted(tree.items())}
    return list(tree.shape) if isinstance(tree, np.ndarray) else tree


def test_a_new_base_starts_the_round_over(bundle, shard, tmp_path):
    base = base_weights(bundle)
    t = trainer(bundle, shard, tmp_path)
    t.run_round(TASK, base)
    shifted = {k: v + 0.01 for k, v in base.items()}

    result = trainer(bundle, shard, tmp_path).run_round(TASK, shifted)

    assert not result.resumed
    assert load_checkpoint(tmp_path / CHECKPOINT)["phase"] == "trained"


def test_encode_before_training_is_a_bug(bundle, shard, tmp_path):
    t = trainer(bundle, shard, tmp_path)
    result = t.run_round(TASK, base_weights(bundle))

    with pytest.raises(InternalError, match="before run_round"):
        t.encode_update(Task(**{**TASK.to_dict(), "round": 1}), result)


def test_a_corrupt_checkpoint_is_refused(bundle, shard, tmp_path):
    trainer(bundle, shard, tmp_path, checkpoint_every=5).run_round(TASK, base_weights(bundle))
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:-50])

    with pytest.raises(CheckpointError, match=f"{CHECKPOINT}.*delete it to start the round over"):
        trainer(bundle, shard, tmp_path)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a zip at all", "corrupt or not an .npz"),
        ({"images": np.zeros((4, 28, 28), np.uint8)}, "lacks labels"),
        ({"images": np.zeros((4, 28, 28), np.float32), "labels": np.zeros(4, np.int64)}, "want uint8"),
        ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.zeros(3, np.int64)}, "want uint8"),
        ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.full(4, 10, np.int64)}, "labels outside 0..9"),
    ],
)
def test_bad_shards_are_refused(bundle, tmp_path, content, message):
    path = tmp_path / "shard.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)

    with pytest.raises(FedkitError, match=message):
        trainer(bundle, path, tmp_path / "work")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 0.0}, "impossible"),
        ({"local_epochs": 0}, "impossible"),
        ({"batch_size": 0}, "impossible"),
        ({"encoding": "int3"}, "int3"),
        ({"encoding": "layered:many"}, "layered:many"),
    ],
)
def test_impossible_tasks_are_refused(change, message):
    with pytest.raises(ProtocolError, match=message):
        Task(**{**TASK.to_dict(), **change})


def test_splitfed_bundles_are_refused(tmp_path, shard):
    out = tmp_path / "splitfed"
    export_bundle(
        load_model("small_cnn"), DevicePlan(cut=3, train_from=2, batch_size=16), out, ("ort",), label_names=LABEL_NAMES
    )

    with pytest.raises(BundleError, match="SplitFed"):
        trainer(Bundle.load(out), shard, tmp_path / "work")


def test_cli_fails_with_one_line(bundle, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_runtime",
            "train",
            "--bundle",
            str(bundle.root),
            "--shard",
            str(tmp_path / "none.npz"),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )

    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "does not exist" in run.stderr


# -- killed and restarted ------------------------------------------------------------------

STEPS = 2 * 90  # the killed run: 800 images, 10% held out, batch 8, 2 epochs


@pytest.mark.parametrize("kind", ["whole-model", "early-exit"])
def test_a_killed_trainer_resumes_to_the_same_weights(request, kind, tmp_path, fashion_train, wait_for_checkpoint):
    # Prepare: one run uninterrupted, for reference; a checkpoint every 7 steps
    bundle = request.getfixturevalue("bundle" if kind == "whole-model" else "exit_bundle")
    shard = write_shard(tmp_path / "shard.npz", fashion_train.images[:800], fashion_train.labels[:800])
    out = tmp_path / "update.bin"

    def command(workdir):
        return [
            sys.executable,
            "-m",
            "device_runtime",
            "train",
            "--bundle",
            str(bundle.root),
            "--shard",
            str(shard),
            "--workdir",
            str(workdir),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--encoding",
            "int8",
            "--lr",
            "0.02",
            "--checkpoint-every",
            "7",
        ]

    started = time.perf_counter()
    proc = subprocess.Popen(command(tmp_path / "reference"), stdout=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, tmp_path / "reference" / CHECKPOINT, lambda state: state["position"]["step"] >= 1)
    first_checkpoint_s = time.perf_counter() - started  # start-up and features
    reference = proc.communicate()[0]
    assert proc.returncode == 0
    reference_payload = out.read_bytes()
    out.unlink()

    # Execute: kill -9 at random moments (fixed seed): twice before the first checkpoint (in
    # start-up or the features), then each time a little after the checkpoint reaches a random step (so kills also land
    # mid-step and mid-checkpoint-write); restart until a run finishes
    rng = np.random.default_rng(1234)
    workdir = tmp_path / "killed"
    checkpoint = workdir / CHECKPOINT
    # one per fifth of the run, none in the last: on a fast machine a kill lands ~25 steps late
    targets = [0, 0, *(rng.integers(k * STEPS // 5 + 1, (k + 1) * STEPS // 5) for k in range(4))]
    interrupted = []
    for target in targets:
        proc = subprocess.Popen(command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if target == 0:
            time.sleep(rng.uniform(0.2, 0.95) * first_checkpoint_s)
        else:
            wait_for_checkpoint(proc, checkpoint, lambda state, target=target: state["position"]["step"] >= int(target))
            time.sleep(rng.uniform(0.0, 0.02))
        proc.kill()  # SIGKILL
        proc.communicate()
        state = load_checkpoint(checkpoint)  # never torn, whatever the moment of the kill
        interrupted.append(None if state is None else (state["phase"], state["position"]["step"]))
    final = subprocess.run(command(workdir), capture_output=True, text=True, check=True)

    # Assert: bit-identical weights and update bytes, and the kills really hit the training
    expected = load_checkpoint(tmp_path / "reference" / CHECKPOINT)
    got = load_checkpoint(checkpoint)
    for name, w in expected["weights"].items():
        np.testing.assert_array_equal(got["weights"][name], w)
    assert out.read_bytes() == reference_payload
    assert got["idempotency_key"] == expected["idempotency_key"]
    assert json.loads(final.stdout)["steps"] == json.loads(reference)["steps"] == STEPS
    assert json.loads(final.stdout)["resumed"]
    assert sum(s is not None and s[0] == "training" and 0 < s[1] < STEPS for s in interrupted) >= 3, interrupted
    assert not list(workdir.glob(".*.tmp")), "temporary files left after the final run"
