"""The edge in process: gradients through a split equal the whole model's at every cut, retried
batches train once, messages and rounds are checked, and each block is averaged over every
copy that trained it, on phones and at the edge."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from splitfed_helpers import MIXED_DEPTHS, activation_message, enrol, make_run, one_step_from, shard

from device_runtime.bundle import Bundle
from device_runtime.client import Assignment
from device_runtime.codec import UpdateHeader, decode, encode
from device_runtime.engines.ort import OrtEngine
from device_runtime.local_round import Task
from device_runtime.manifest import DevicePlan
from device_runtime.split_trainer import SplitTrainer
from exporters.bundle import export_bundle
from toolkit.aggregator.config import parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.store import Store
from toolkit.data import LABEL_NAMES
from toolkit.errors import ConfigError
from toolkit.models import SplittableModel, load_model
from toolkit.splitfed.edge import EdgeConfig, SplitFedEdge, edge_step, initial_weights

BATCH = 8


def split_gradients(model: SplittableModel, bundle: Bundle, x: torch.Tensor, y: torch.Tensor):
    """Whole-model gradients (eager) and the split's: the phone's by ORT from the edge's
    gradient at the cut, the edge's by PyTorch; (loss, split loss, whole, phone, edge)."""
    params = dict(model.root.named_parameters())
    loss = F.cross_entropy(model.forward(x), y)
    whole = {k: g.numpy() for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)}

    engine = OrtEngine(bundle)
    h = engine.features(x.numpy())
    part = copy.deepcopy(model.edge_part(bundle.manifest.plan.cut)).eval()
    split_loss, grad = edge_step(part, torch.optim.SGD(part.parameters(), lr=0.1), engine.forward(h), y.numpy())
    phone = engine.backward_from(h, grad)
    edge = {name: p.grad.numpy() for name, p in part.named_parameters()}
    return loss.item(), split_loss, whole, phone, edge


def assert_gradients_match(whole, phone, edge, trained_names):
    assert set(phone) | set(edge) == set(trained_names) and not set(phone) & set(edge)
    for name, g in {**phone, **edge}.items():
        scale = float(np.abs(whole[name]).max())
        np.testing.assert_allclose(g, whole[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_gradients_through_every_small_cnn_cut_equal_the_unsplit_models(model, small_cnn_bundle, cut):
    # Prepare: the phone trains every block before the cut, so every parameter has a gradient
    bundle = Bundle.load(small_cnn_bundle(cut, train_blocks=len(model.parameterised_blocks(cut))))
    g = torch.Generator().manual_seed(cut)
    x, y = torch.randn(BATCH, *model.input_shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)

    # Execute
    loss, split_loss, whole, phone, edge = split_gradients(model, bundle, x, y)

    # Assert
    assert split_loss == pytest.approx(loss, rel=1e-5)
    assert_gradients_match(whole, phone, edge, [name for name, _ in model.root.named_parameters()])


@pytest.fixture(scope="module")
def smooth_mobilenet(one_torch_thread):
    """MobileNetV2, pretrained, with SiLU for ReLU6. ReLU6's kinks at 0 and 6 make "equal
    gradients" ill-posed in float32: the two sides' activations differ by ~1e-6, and an input
    with a pre-activation that close to a kink (about one in ten) sends them down different
    branches, moving a gradient by up to 3e-3 of its scale. Through smooth activations they
    agree to ~3e-6 at every cut; what is tested, the split and its artifacts, is the same."""
    model = load_model("mobilenet_v2")
    for module in list(model.root.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ReLU6):
                setattr(module, name, torch.nn.SiLU())
    return model


MOBILENET_SPLIT_CUTS = range(1, 21)  # a block or more on each side of the 21


@pytest.mark.slow
@pytest.mark.parametrize("cut", MOBILENET_SPLIT_CUTS)
def test_gradients_through_every_mobilenet_cut_equal_the_unsplit_models(smooth_mobilenet, tmp_path, cut):
    # Prepare: the phone trains the last block with parameters before the cut, the ones before
    # it are frozen
    model = smooth_mobilenet
    assert list(MOBILENET_SPLIT_CUTS) == model.cuts[1:-1]
    train_from = model.train_from(cut, 1)
    export_bundle(
        model,
        DevicePlan(cut=cut, train_from=train_from, batch_size=BATCH),
        tmp_path / "bundle",
        label_names=LABEL_NAMES,
    )
    g = torch.Generator().manual_seed(cut)
    x, y = torch.randn(BATCH, *model.input_shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)

    # Execute
    loss, split_loss, whole, phone, edge = split_gradients(model, Bundle.load(tmp_path / "bundle"), x, y)

    # Assert
    assert split_loss == pytest.approx(loss, rel=1e-5)
    trained = [name for name, _ in model.part(train_from, len(model.block_names)).named_parameters()]
    assert_gradients_match(whole, phone, edge, trained)


@pytest.fixture
def run(tmp_path, model):
    coordinator, edge = make_run(tmp_path, model, min_reports=3)
    yield coordinator, edge
    edge.close()


def started(coordinator, device_id: str) -> dict:
    enrol(coordinator, device_id)
    task = coordinator.task_for(device_id)
    assert task["status"] == "task"
    return task


def test_a_retried_batch_gets_the_same_answer_and_trains_once(run, model):
    coordinator, edge = run
    started(coordinator, "a")
    message = activation_message(model, "a", 1, 0, cut=3)
    v0 = decode(coordinator.weights(0)[0]).tensors

    first = edge.train_batch("a", 0, message)
    again = edge.train_batch("a", 0, message)

    assert (first.status, first.code, again.status, again.code) == ("trained", 200, "retry", 200)
    assert again.body == first.body
    reply = decode(first.body)
    assert reply.header.kind == "gradient" and set(reply.tensors) == {"features.2", "loss"}
    assert reply.encodings["features.2"] == "int8"  # the activation's encoding, mirrored
    once = one_step_from(model, v0, 3, message, lr=0.05)
    trained = {k: v0[k] + d for k, d in edge.delta("a", 1, set()).items()}
    assert trained.keys() == once.keys()
    for name in once:
        np.testing.assert_allclose(trained[name], once[name], rtol=1e-5, atol=1e-6, err_msg=name)
    (traffic,) = edge.status().phones
    assert (traffic.batches, traffic.retries, traffic.samples, traffic.cut) == (1, 1, 4, 3)
    assert traffic.activation_bytes == 2 * len(message) and traffic.gradient_bytes == 2 * len(first.body)


def test_batch_zero_starts_the_round_over_and_an_older_id_is_refused(run, model):
    coordinator, edge = run
    started(coordinator, "a")
    v0 = decode(coordinator.weights(0)[0]).tensors
    for batch in range(3):
        assert edge.train_batch("a", batch, activation_message(model, "a", 1, 0, cut=3, seed=batch)).code == 200

    older = edge.train_batch("a", 1, activation_message(model, "a", 1, 0, cut=3, seed=1))
    restart = activation_message(model, "a", 1, 0, cut=3, seed=9)
    restarted = edge.train_batch("a", 0, restart)

    assert (older.code, older.status) == (409, "restart") and "batch 0" in older.reason
    assert restarted.status == "trained"
    once = one_step_from(model, v0, 3, restart, lr=0.05)
    for name, d in edge.delta("a", 1, set()).items():
        np.testing.assert_allclose(v0[name] + d, once[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_messages_that_do_not_fit_are_refused(run, model):
    coordinator, edge = run
    started(coordinator, "a")
    good = decode(activation_message(model, "a", 1, 0, cut=3))
    act = good.tensors["features.2"]

    def message(tensors, device_id="a", kind="activation", n=4):
        return encode(UpdateHeader(device_id, 1, 0, n, kind=kind), tensors, "fp32")

    cases = {
        "does not decode": b"not a codec message",
        "signed for device 'b'": message(good.tensors, device_id="b"),
        "takes 'activation'": message(good.tensors, kind="delta"),
        "send 'labels'": message({"features.2": act}),
        "not the output of a block": message(
            {"classifier": np.zeros((4, 10), np.float32), "labels": good.tensors["labels"]}
        ),
        "do not fit 4 samples": message({"features.2": act[:, :8], "labels": good.tensors["labels"]}),
        "class indices": message({"features.2": act, "labels": np.array([0, 1, 2, 10], np.float32)}),
    }
    for reason, body in cases.items():
        reply = edge.train_batch("a", 0, body)
        assert (reply.code in (403, 422), reason in reply.reason) == (True, True), (reason, reply)
    assert edge.status().phones == [] and edge.status().copies == 0  # nothing was trained or counted


def test_batches_outside_the_phones_open_round_are_refused(run, model):
    coordinator, edge = run
    enrol(coordinator, "stranger")
    started(coordinator, "a")

    not_given = edge.train_batch("stranger", 0, activation_message(model, "stranger", 1, 0, cut=3))
    wrong_base = edge.train_batch("a", 0, activation_message(model, "a", 1, 5, cut=3))
    wrong_round = edge.train_batch("a", 0, activation_message(model, "a", 2, 0, cut=3))

    assert (not_given.code, wrong_base.code, wrong_round.code) == (403, 422, 403)
    assert "pull a task" in not_given.reason and "version 0" in wrong_base.reason


def test_fedbuff_runs_are_refused(tmp_path, model):
    (tmp_path / "weights.bin").write_bytes(initial_weights(model, 0))
    stages = [{"name": "s", "rounds": 1, "lr": 0.1}]
    config = parse_config({"name": "b", "weights": "weights.bin", "mode": "fedbuff", "stages": stages}, tmp_path)

    with pytest.raises(ConfigError, match="fedavg"):
        SplitFedEdge(Coordinator(config, Store(config.default_db())), model)


def test_a_new_phone_past_the_copy_limit_is_told_to_retry(tmp_path, model):
    coordinator, edge = make_run(tmp_path, model, edge_config=EdgeConfig(max_copies=1))
    started(coordinator, "a")
    started(coordinator, "b")
    assert edge.train_batch("a", 0, activation_message(model, "a", 1, 0, cut=3)).code == 200

    busy = edge.train_batch("b", 0, activation_message(model, "b", 1, 0, cut=3))

    assert (busy.code, busy.status, busy.retry_after) == (503, "busy", 1)
    assert edge.status().busy_answers == 1
    edge.close()


def test_each_block_is_averaged_over_every_copy_that_trained_it(tmp_path, model, small_cnn_bundle, fashion_train):
    # Prepare: three phones, three cuts and depths, different sample counts; each trains a round in turn
    coordinator, edge = make_run(tmp_path, model, min_reports=3, batch_size=16)
    v0 = decode(coordinator.weights(0)[0]).tensors
    sizes = (48, 32, 16)
    copies = {}  # device → (samples, every tensor its round trained: the phone's as pushed, the edge's)
    for i, ((cut, train_blocks), n) in enumerate(zip(MIXED_DEPTHS, sizes, strict=True)):
        device_id = f"p{cut}"
        bundle = Bundle.load(small_cnn_bundle(cut, train_blocks))
        task = Task(**Assignment.from_json(started(coordinator, device_id)).task_fields(bundle.manifest.plan))

        def exchange(batch, body, d=device_id):
            return edge.train_batch(d, batch, body).body

        trainer = SplitTrainer(
            bundle,
            shard(tmp_path, fashion_train, 100 * i, n),
            exchange,
            workdir=tmp_path / device_id,
            device_id=device_id,
        )

        # Execute
        result = trainer.run_round(task, v0)
        encoded = trainer.encode_update(task, result)
        pushed = decode(encoded.payload).tensors
        copies[device_id] = (n, {**edge.delta(device_id, 1, set()), **pushed})
        assert coordinator.push(device_id, encoded.idempotency_key, encoded.payload, None).status == "accepted"
        assert coordinator.store.updates(round_=1)[-1].nbytes == len(encoded.payload)  # what the phone sent

    # Assert: the round closed, and each tensor moved by the sample-weighted mean of its holders
    assert coordinator.store.latest_version().version == 1
    v1 = decode(coordinator.weights(1)[0]).tensors
    for name in v0:
        holders = [(n, tensors[name]) for n, tensors in copies.values() if name in tensors]
        assert holders, name  # with these cuts every block trained somewhere
        expected = v0[name] + sum(n * d for n, d in holders) / sum(n for n, _ in holders)
        np.testing.assert_allclose(v1[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
    held = {name: sum(name in t for _, t in copies.values()) for name in v0}
    # features.0 trains on p1 only (frozen on the others); features.1 on p1's edge copy and on p3;
    # features.2 on p1's edge copy, p3 and p4; the classifier on the three edge copies
    assert [
        held[n] for n in ("features.0.0.weight", "features.1.0.weight", "features.2.0.weight", "classifier.weight")
    ] == [1, 2, 3, 3]
    assert set(copies["p1"][1]) == set(v0)  # phone p1 trains features.0, its edge copy the rest

    # Round 2: the edge drops round 1's copies and starts a phone's copy from the new global model
    started_again = coordinator.task_for("p3")
    assert started_again["round"] == 2 and started_again["base_version"] == 1
    message = activation_message(model, "p3", 2, 1, cut=3)
    assert edge.train_batch("p3", 0, message).code == 200
    assert edge.status().copies == 1
    once = one_step_from(model, v1, 3, message, lr=0.05)
    for name, d in edge.delta("p3", 2, set()).items():
        np.testing.assert_allclose(v1[name] + d, once[name], rtol=1e-5, atol=1e-6, err_msg=name)
    edge.close()


def test_an_edge_that_lost_the_phones_round_answers_restart_and_batch_0_starts_it_over(run, model):
    # Prepare: two batches trained, then the aggregator restarts: a new edge on the same run
    coordinator, edge = run
    started(coordinator, "a")
    v0 = decode(coordinator.weights(0)[0]).tensors
    for batch in range(2):
        assert edge.train_batch("a", batch, activation_message(model, "a", 1, 0, cut=3, seed=batch)).status == "trained"
    restarted = SplitFedEdge(coordinator, model)

    # Execute
    lost = restarted.train_batch("a", 2, activation_message(model, "a", 1, 0, cut=3, seed=2))
    again = activation_message(model, "a", 1, 0, cut=3, seed=9)
    first = restarted.train_batch("a", 0, again)
    gap = restarted.train_batch("a", 2, activation_message(model, "a", 1, 0, cut=3, seed=2))

    # Assert: a definite answer, not a copy missing batches 0 and 1; batch 0 starts from the base
    assert (lost.code, lost.status) == (409, "restart")
    assert "no state for round 1" in lost.reason and "send batch 0" in lost.reason
    assert (
        first.status == "trained"
        and (gap.code, gap.status) == (409, "restart")
        and "cannot follow batch 0" in gap.reason
    )
    once = one_step_from(model, v0, 3, again, lr=0.05)
    for name, d in restarted.delta("a", 1, set()).items():
        np.testing.assert_allclose(v0[name] + d, once[name], rtol=1e-5, atol=1e-6, err_msg=name)
    restarted.close()


def test_a_splitfed_push_whose_edge_part_was_lost_is_answered_restart(
    run, model, small_cnn_bundle, fashion_train, tmp_path
):
    # Prepare: a phone trains its round, then the aggregator restarts before its push
    coordinator, edge = run
    bundle = Bundle.load(small_cnn_bundle(3, 3))
    task = Task(**Assignment.from_json(started(coordinator, "a")).task_fields(bundle.manifest.plan))
    v0 = decode(coordinator.weights(0)[0]).tensors
    trainer = SplitTrainer(
        bundle,
        shard(tmp_path, fashion_train, 0, 40),
        lambda batch, body: edge.train_batch("a", batch, body).body,
        workdir=tmp_path / "a",
        device_id="a",
    )
    encoded = trainer.encode_update(task, trainer.run_round(task, v0))
    restarted = SplitFedEdge(coordinator, model)

    # Execute
    lost = coordinator.push("a", encoded.idempotency_key, encoded.payload, None)
    whole = encode(UpdateHeader("a", 1, 0, 40, kind="delta"), {"classifier.bias": np.zeros(10, np.float32)}, "fp32")
    whole_model = restarted.delta("a", 1, set(decode(whole).tensors))

    # Assert: refused with a definite answer, nothing stored; an update holding the last block
    # (a whole-model phone) has nothing to merge and is not refused
    assert (lost.status, lost.code) == ("restart", 409) and "train the round again from batch 0" in lost.reason
    assert coordinator.store.updates(round_=1) == [] and whole_model is None
    restarted.close()
