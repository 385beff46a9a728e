"""The phone's side of SplitFed: with the edge's arithmetic in process, a round trains exactly as
SGD on the whole model does; messages are int8 activations named after the cut, with their
labels and batch ids 0, 1, ...; wrong bundles, weights and answers are refused. The real edge
over HTTP is in tests/toolkit/splitfed."""

import copy

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_runtime.bundle import Bundle
from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.codec import UpdateHeader, decode, encode
from device_runtime.errors import BundleError, CodecError, ProtocolError
from device_runtime.split_trainer import SplitTrainer, edge_exchange
from device_runtime.trainer import Task
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
        reply = encode(header, {self.name: grad, "loss": np.float32(loss)}, {self.name: message.encodings[self.name], "loss": "fp32"})
        self.batches.append(batch)
        self.messages.append((payload, message))
        self.replies.append(reply)
        return reply


def test_a_round_trains_as_sgd_on_the_whole_model(tmp_path, model, bundle, global_weights, fashion_train):
    # Prepare: 24 images in batches of 32, so each of the 3 epochs is one full batch (its
    # gradient does not depend on the shuffle); fp32 both ways, so nothing is lost on the wire
    edge = InProcessEdge(model, global_weights, TASK.lr)
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 24), edge, encoding="fp32")
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
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 70), edge, device_id="phone-7")
    task = Task(round=4, base_version=3, lr=0.05, local_epochs=1, batch_size=32, encoding="int8", seed=1)

    result = trainer.run_round(task, global_weights)

    assert edge.batches == [0, 1, 2] and result.steps == 3
    for _, m in edge.messages:
        assert (m.header.device_id, m.header.round, m.header.base_version, m.header.kind) == ("phone-7", 4, 3, "activation")
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
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 40), edge, device_id="p")
    task = Task(round=2, base_version=1, lr=0.05, local_epochs=1, batch_size=16, encoding="int8", seed=0)
    result = trainer.run_round(task, global_weights)

    first, again = trainer.encode_update(task, result), trainer.encode_update(task, result)

    assert first == again and first.idempotency_key.startswith("p:2:")
    update = decode(first.payload)
    assert (update.header.kind, update.header.num_samples, update.header.base_version) == ("delta", 40, 1)
    assert set(update.tensors) == {t.name for t in bundle.manifest.trainable}


def test_wrong_bundles_encodings_and_weights_are_refused(tmp_path, model, bundle, small_cnn_bundle, global_weights, fashion_train):
    shard = make_shard(tmp_path, fashion_train, 8)
    edge = InProcessEdge(model, global_weights, 0.05)
    with pytest.raises(BundleError, match="LocalTrainer"):
        SplitTrainer(Bundle.load(small_cnn_bundle()), shard, edge)
    with pytest.raises(CodecError, match="int3"):
        SplitTrainer(bundle, shard, edge, encoding="int3")
    lacking = {k: v for k, v in global_weights.items() if not k.startswith("features.1.")}
    with pytest.raises(ProtocolError, match="features.1"):
        SplitTrainer(bundle, shard, edge).run_round(TASK, lacking)
    assert edge.batches == []


@pytest.mark.parametrize(
    "answer, reason",
    [
        (lambda batch, payload: b"garbage", "not the gradient of this batch"),
        (lambda batch, payload: payload, "not the gradient of this batch"),  # the activation echoed back
        (lambda batch, payload: encode(
            UpdateHeader("edge", 1, 0, 8, kind="delta"),
            {"features.1": decode(payload).tensors["features.1"], "loss": np.float32(1.0)}, "fp32",
        ), "'delta' message"),
    ],
)
def test_an_answer_that_is_not_this_batchs_gradient_raises(tmp_path, bundle, global_weights, fashion_train, answer, reason):
    trainer = SplitTrainer(bundle, make_shard(tmp_path, fashion_train, 8), answer)
    with pytest.raises(ProtocolError, match=reason):
        trainer.run_round(TASK, global_weights)


def test_edge_exchange_puts_the_batch_retries_a_busy_edge_and_raises_on_a_refusal():
    seen, sleeps = [], []
    answers = iter([
        httpx.Response(503, headers={"Retry-After": "2"}, json={"status": "busy", "reason": "at capacity"}),
        httpx.Response(200, content=b"gradient"),
        httpx.Response(409, json={"status": "conflict", "reason": "round 3 is closed; pull a new task"}),
    ])

    def handler(request):
        seen.append(request)
        return next(answers)

    retry = RetryPolicy(attempts=3, base_s=0.1)
    client = SyncClient("http://edge", "cred", retry=retry, transport=httpx.MockTransport(handler), sleep=sleeps.append)
    exchange = edge_exchange(client)

    assert exchange(5, b"activation") == b"gradient"
    with pytest.raises(ProtocolError, match="round 3 is closed"):
        exchange(6, b"activation")
    assert [(r.method, r.url.path) for r in seen] == [("PUT", "/v1/splitfed/batches/5")] * 2 + [("PUT", "/v1/splitfed/batches/6")]
    assert seen[0].content == b"activation" and seen[0].headers["Authorization"] == "Bearer cred"
    assert sleeps == [2.0]  # Retry-After honoured
