"""The phone's side of SplitFed: with the edge's arithmetic in process, a round trains exactly as
SGD on the whole model does; messages are int8 activations named after the cut, with their
labels and batch ids 0, 1, ...; wrong bundles, weights and answers are refused; an edge that
lost the round restarts it from the base, a stopped trainer resumes from its checkpoint, both
to the same weights. The real edge over HTTP is in tests/toolkit/splitfed (and a phone process
killed against it in test_kill.py there)."""

import copy

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_runtime.bundle import Bundle
from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.codec import UpdateHeader, decode, encode
from device_runtime.errors import BundleError, CodecError, ProtocolError, RestartRound
from device_runtime.local_round import Task
from device_runtime.split_trainer import SplitTrainer, edge_exchange
from toolkit.data import transform, write_shard
from toolkit.models import load_model
from toolkit.splitfed.edge import edge_step, initial_weights

CUT = 2  # the phone: features.0 frozen, features.1 trains; the edge: features.2, pool, classifier
TASK = Task(round=1, base_version=0, lr=0.05, local_epochs=3, batch_size=32, encoding="fp32", seed=0)


@pytest.fixture(scope="module")
def model(one_torch_thread):
    torch.manual_seed(0)
    return load_model("small_cnn")


@pytest.fixture(scope="module")
def bundle(small_cnn_bundle):
    return Bundle.load(small_cnn_bundle(CUT, train_blocks=1))


@pytest.fixture(scope="module")
def global_weights(model):
    return decode(initial_weights(model, 0)).tensors


def make_shard(tmp_path, data, n):
    return write_shard(tmp_path / f"shard-{n}.npz", data.images[:n], data.labels[:n])


class InProcessEdge:
    """The edge's arithmetic for one phone and one round (toolkit.splitfed.edge.edge_step),
    recording every message and batch id it is sent."""

    def __init__(self, model, weights, lr, momentum=0.9):
        self.name = model.block_names[CUT - 1]
        self.part = copy.deepcopy(model.edge_part(CUT)).eval()
        with torch.no_grad():
            for name, p in self.part.named_parameters():
                p.copy_(torch.from_numpy(weights[name]))
        self.optimizer = torch.optim.SGD(self.part.parameters(), lr=lr, momentum=momentum)
        self.batches, self.messages, self.replies = [], [], []

    def __call__(self, batch: int, payload: bytes) -> bytes:
        message = decode(payload)
        labels = message.tensors["labels"].astype(np.int64)
        loss, grad = edge_step(self.part, self.optimizer, message.tensors[self.name], labels)
        header = UpdateHeader("edge", message.header.round, message.header.base_version, len(labels), kind="gradient")
        rng = np.random.default_rng([message.header.round, batch])  # as the edge's: same batch, same bytes
        reply = encode(
            header,
            {self.name: grad, "loss": np.float32(loss)},
            {self.name: message.encodings[self.name], "loss": "fp32"},
            rng=rng,
        )
        self.batches.append(batch)
        self.messages.append((payload, message))
        self.replies.append(reply)
        return reply


def test_a_round_trains_as_sgd_on_the_whole_model(tmp_path, model, bundle, global_weights, fashion_train):
    # Prepare: 24 images in batches of 32, so each of the 3 epochs is one full batch (its
    # gradient does not depend on the shuffle); fp32 both ways, so nothing is lost on the wire
    edge = InProcessEdge(model, global_weights, TASK.lr)
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 24), edge, workdir=tmp_path, encoding="fp32")
    whole = copy.deepcopy(model)
    trained = dict(whole.part(1, len(whole.block_names)).named_parameters())
    optimizer = torch.optim.SGD(trained.values(), lr=TASK.lr, momentum=TASK.momentum)
    x, y = torch.from_numpy(transform(fashion_train.images[:24])), torch.from_numpy(fashion_train.labels[:24])

    # Execute
    result = trainer.run_round(TASK, global_weights)
    losses = []
    for _ in range(TASK.local_epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(whole.forward(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # Assert: the phone's blocks, the edge's and the loss all follow the whole model
    assert (result.steps, result.num_samples, edge.batches) == (3, 24, [0, 1, 2])
    assert result.train_loss == pytest.approx(np.mean(losses), rel=1e-5)
    phone = {name: global_weights[name] + d for name, d in result.update.items()}
    assert sorted(phone) == ["features.1.0.weight", "features.1.1.bias", "features.1.1.weight"]
    for name, w in {**phone, **{n: p.detach().numpy() for n, p in edge.part.named_parameters()}}.items():
        np.testing.assert_allclose(w, trained[name].detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_messages_are_int8_activations_named_after_the_cut_with_labels_and_batch_ids(
    tmp_path, model, bundle, global_weights, fashion_train
):
    edge = InProcessEdge(model, global_weights, 0.05)
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 70), edge, workdir=tmp_path, device_id="phone-7")
    task = Task(round=4, base_version=3, lr=0.05, local_epochs=1, batch_size=32, encoding="int8", seed=1)

    result = trainer.run_round(task, global_weights)

    assert edge.batches == [0, 1, 2] and result.steps == 3
    for _, m in edge.messages:
        assert (m.header.device_id, m.header.round, m.header.base_version, m.header.kind) == (
            "phone-7",
            4,
            3,
            "activation",
        )
        assert m.encodings == {"features.1": "int8", "labels": "fp32"}
        assert m.tensors["features.1"].shape == (m.header.num_samples, 16, 8, 8)
    labels = np.concatenate([m.tensors["labels"] for _, m in edge.messages])
    assert sorted(labels.astype(int)) == sorted(fashion_train.labels[:70])  # every sample once, its own label
    assert result.activation_bytes == sum(len(p) for p, _ in edge.messages)
    assert result.gradient_bytes == sum(len(r) for r in edge.replies)
    fp32 = 70 * (16 * 8 * 8 + 1) * 4
    assert result.activation_bytes < fp32 / 3  # int8: about a quarter of fp32


def test_the_update_holds_the_phones_tensors_and_is_the_same_bytes_when_asked_again(
    tmp_path, model, bundle, global_weights, fashion_train
):
    edge = InProcessEdge(model, global_weights, 0.05)
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 40), edge, workdir=tmp_path, device_id="p")
    task = Task(round=2, base_version=1, lr=0.05, local_epochs=1, batch_size=16, encoding="int8", seed=0)
    result = trainer.run_round(task, global_weights)

    first, again = trainer.encode_update(task, result), trainer.encode_update(task, result)

    assert first == again and first.idempotency_key.startswith("p:2:")
    update = decode(first.payload)
    assert (update.header.kind, update.header.num_samples, update.header.base_version) == ("delta", 40, 1)
    assert set(update.tensors) == {t.name for t in bundle.manifest.trainable}


def test_wrong_bundles_encodings_and_weights_are_refused(
    tmp_path, model, bundle, small_cnn_bundle, global_weights, fashion_train
):
    shard = make_shard(tmp_path, fashion_train, 8)
    edge = InProcessEdge(model, global_weights, 0.05)
    with pytest.raises(BundleError, match="LocalTrainer"):
        SplitTrainer(Bundle.load(small_cnn_bundle()), shard, edge, workdir=tmp_path)
    with pytest.raises(CodecError, match="int3"):
        SplitTrainer(bundle, shard, edge, workdir=tmp_path, encoding="int3")
    lacking = {k: v for k, v in global_weights.items() if not k.startswith("features.1.")}
    with pytest.raises(ProtocolError, match=r"features\.1"):
        SplitTrainer(bundle, shard, edge, workdir=tmp_path).run_round(TASK, lacking)
    assert edge.batches == []


@pytest.mark.parametrize(
    "answer, reason",
    [
        (lambda batch, payload: b"garbage", "not the gradient of this batch"),
        (lambda batch, payload: payload, "not the gradient of this batch"),  # the activation echoed back
        (
            lambda batch, payload: encode(
                UpdateHeader("edge", 1, 0, 8, kind="delta"),
                {"features.1": decode(payload).tensors["features.1"], "loss": np.float32(1.0)},
                "fp32",
            ),
            "'delta' message",
        ),
    ],
)
def test_an_answer_that_is_not_this_batchs_gradient_raises(
    tmp_path, bundle, global_weights, fashion_train, answer, reason
):
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 8), answer, workdir=tmp_path)
    with pytest.raises(ProtocolError, match=reason):
        trainer.run_round(TASK, global_weights)


def test_edge_exchange_puts_the_batch_retries_a_busy_edge_and_raises_on_a_refusal():
    seen, sleeps = [], []
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "2"}, json={"status": "busy", "reason": "at capacity"}),
            httpx.Response(200, content=b"gradient"),
            httpx.Response(409, json={"status": "conflict", "reason": "round 3 is closed; pull a new task"}),
            httpx.Response(
                409, headers={"X-Fedkit-Batch": "restart"}, json={"status": "stale", "reason": "send batch 0"}
            ),
        ]
    )

    def handler(request):
        seen.append(request)
        return next(answers)

    retry = RetryPolicy(attempts=3, base_s=0.1)
    client = SyncClient("http://edge", "cred", retry=retry, transport=httpx.MockTransport(handler), sleep=sleeps.append)
    exchange = edge_exchange(client)

    assert exchange(5, b"activation") == b"gradient"
    with pytest.raises(ProtocolError, match="round 3 is closed") as closed:
        exchange(6, b"activation")
    with pytest.raises(RestartRound, match="batch 7: send batch 0"):
        exchange(7, b"activation")
    assert not isinstance(closed.value, RestartRound)  # only the marked answer restarts the round
    assert [(r.method, r.url.path) for r in seen] == [("PUT", "/v1/splitfed/batches/5")] * 2 + [
        ("PUT", "/v1/splitfed/batches/6"),
        ("PUT", "/v1/splitfed/batches/7"),
    ]
    assert seen[0].content == b"activation" and seen[0].headers["Authorization"] == "Bearer cred"
    assert sleeps == [2.0]  # Retry-After honoured


# -- crashes -------------------------------------------------------------------------------

KILL_TASK = Task(
    round=1, base_version=0, lr=0.05, local_epochs=2, batch_size=16, encoding="int8", seed=3
)  # 2 x 5 batches


class ForgetfulEdge:
    """The edge's arithmetic, restarted on batch 0; it loses its state (as an aggregator that
    restarts) before the batches in ``lose_at`` and answers RestartRound until batch 0 comes."""

    def __init__(self, model, weights, lose_at=()):
        self.model, self.weights, self.lose_at = model, weights, list(lose_at)
        self.edge, self.batches = None, []

    def __call__(self, batch: int, payload: bytes) -> bytes:
        self.batches.append(batch)
        if self.lose_at and batch == self.lose_at[0]:
            self.lose_at.pop(0)
            self.edge = None
        if batch == 0:
            self.edge = InProcessEdge(self.model, self.weights, KILL_TASK.lr)
        if self.edge is None:
            raise RestartRound(f"batch {batch}: the edge holds no state for round 1: send batch 0")
        return self.edge(batch, payload)


def edge_tensors(edge: ForgetfulEdge) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in edge.edge.part.named_parameters()}


def test_an_edge_that_lost_the_round_restarts_it_from_the_base_to_the_same_update(
    tmp_path, model, bundle, global_weights, fashion_train
):
    # Prepare: one round uninterrupted; one whose edge loses its state before batches 3 and 7
    shard = make_shard(tmp_path, fashion_train, 80)
    calm = ForgetfulEdge(model, global_weights)
    reference = SplitTrainer(bundle, shard, calm, workdir=tmp_path / "calm")
    expected = reference.run_round(KILL_TASK, global_weights)
    forgetful = ForgetfulEdge(model, global_weights, lose_at=(3, 7))
    trainer = SplitTrainer(bundle, shard, forgetful, workdir=tmp_path / "forgetful")

    # Execute
    result = trainer.run_round(KILL_TASK, global_weights)

    # Assert: batch 0 sent again after each loss; phone and edge end where the calm round ends, bit for bit
    assert forgetful.batches == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, *range(10)]
    assert (result.restarts, result.steps, expected.restarts) == (2, 10, 0)
    for name, d in expected.update.items():
        np.testing.assert_array_equal(result.update[name], d, err_msg=name)
    for name, w in edge_tensors(calm).items():
        np.testing.assert_array_equal(edge_tensors(forgetful)[name], w, err_msg=name)
    assert result.train_loss == expected.train_loss
    assert result.activation_bytes > expected.activation_bytes  # the lost batches' bytes were sent all the same
    assert trainer.encode_update(KILL_TASK, result).payload == reference.encode_update(KILL_TASK, expected).payload


def test_an_edge_that_keeps_losing_the_round_raises_a_protocol_error(
    tmp_path, model, bundle, global_weights, fashion_train
):
    edge = ForgetfulEdge(model, global_weights, lose_at=(1, 1, 1, 1))
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 80), edge, workdir=tmp_path)

    with pytest.raises(ProtocolError, match=r"4 times in a row.*keeps restarting"):
        trainer.run_round(KILL_TASK, global_weights)
    assert edge.batches == [0, 1] * 4


class Stop(Exception):
    """Stands for the process being killed."""


def test_a_stopped_trainer_resumes_from_its_checkpoint_to_the_same_weights(
    tmp_path, model, bundle, global_weights, fashion_train
):
    # Prepare: the reference round; then a phone stopped as it sends batch 6 (the edge never sees it)
    shard = make_shard(tmp_path, fashion_train, 80)
    calm = ForgetfulEdge(model, global_weights)
    expected = SplitTrainer(bundle, shard, calm, workdir=tmp_path / "calm").run_round(KILL_TASK, global_weights)
    edge = ForgetfulEdge(model, global_weights)

    def stopping(batch, payload):
        if batch == 6:
            raise Stop
        return edge(batch, payload)

    with pytest.raises(Stop):
        SplitTrainer(bundle, shard, stopping, workdir=tmp_path / "phone").run_round(KILL_TASK, global_weights)

    # Execute: a new trainer on the same folder
    result = SplitTrainer(bundle, shard, edge, workdir=tmp_path / "phone").run_round(KILL_TASK, global_weights)

    # Assert: it went on at batch 6 (no restart) and ended where the calm round ends
    assert edge.batches == list(range(10)) and result.resumed and result.restarts == 0
    for name, d in expected.update.items():
        np.testing.assert_array_equal(result.update[name], d, err_msg=name)
    for name, w in edge_tensors(calm).items():
        np.testing.assert_array_equal(edge_tensors(edge)[name], w, err_msg=name)


def test_a_push_answered_restart_trains_the_round_again_with_the_same_residuals(
    tmp_path, model, bundle, global_weights, fashion_train
):
    # Prepare: a round trained and encoded (int8: the encoding leaves residuals behind)
    edge = ForgetfulEdge(model, global_weights)
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 80), edge, workdir=tmp_path)
    first = trainer.encode_update(KILL_TASK, trainer.run_round(KILL_TASK, global_weights))
    assert any(np.any(r != 0) for r in trainer.error_feedback.state_dict().values())

    # Execute: the push was answered "restart"; the phone's loop trains the same task again
    trainer.restart_round(KILL_TASK)
    residuals = trainer.error_feedback.state_dict()
    again = trainer.encode_update(KILL_TASK, trainer.run_round(KILL_TASK, global_weights))

    # Assert: from batch 0 again, from the residuals before the first encoding: the same update
    assert edge.batches == [*range(10), *range(10)]
    assert all(not np.any(r) for r in residuals.values())
    assert again == first
