"""Validation probes on the phone (device_runtime.probes, the phone loop): a training phone answers
the open probes between its tasks, with the counts of its held-out slice and nothing else."""

from __future__ import annotations

import json

import httpx
import pytest

from android_harness.deploy import LocalTarget
from device_runtime.engines.inference import inference_options, load_onnxruntime
from device_runtime.errors import FedkitError
from device_runtime.local_round import load_shard
from device_runtime.phone_loop import PhoneLoop
from device_runtime.preprocess import InputSpec, prepare
from device_runtime.probes import BATCH, evaluate_probe
from device_runtime.trainer import holdout_index
from toolkit.aggregator.admin import issue_tokens
from toolkit.data import write_shard


@pytest.fixture(scope="module")
def onnx_model(one_torch_thread) -> bytes:
    import torch

    from toolkit.models import load_model
    from toolkit.nas.fleet import probe_model

    torch.manual_seed(0)
    return probe_model(load_model("small_cnn"))[0]


def _held_out_counts(blob: bytes, shard, fraction: float = 0.1) -> tuple[int, int]:
    """The model's right answers on the shard's held-out slice, run here with ONNX Runtime."""
    session = load_onnxruntime().InferenceSession(blob, inference_options(), providers=["CPUExecutionProvider"])
    images, labels = load_shard(shard, 10)
    held = holdout_index(len(labels), fraction)
    correct = 0
    for i in range(0, len(held), BATCH):
        idx = held[i : i + BATCH]
        correct += int(
            (session.run(None, {"input": prepare(images[idx], InputSpec())})[0].argmax(1) == labels[idx]).sum()
        )
    return correct, len(held)


def test_a_training_phone_answers_an_open_probe_once_between_its_tasks(
    serve_run, small_cnn_bundle, fashion_train, tmp_path, onnx_model
):
    url, coordinator = serve_run(small_cnn_bundle())
    admin = {"Authorization": f"Bearer {issue_tokens(coordinator.store, 1, 'admin')[0]}"}
    probe = httpx.post(f"{url}/v1/probes", content=onnx_model, headers=admin).json()["probe"]
    (token,) = issue_tokens(coordinator.store, 1)
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"url": url, "device_id": "p1", "enrol_token": token}))
    shard = write_shard(tmp_path / "s.npz", fashion_train.images[:300], fashion_train.labels[:300])
    phone = tmp_path / "phone"
    LocalTarget(phone).install([small_cnn_bundle()], shard, cred)

    pushed = PhoneLoop(phone, max_wait_s=0.2).run()

    events = [json.loads(line) for line in (phone / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    answered = [e for e in events if e["event"] == "probe"]
    result = httpx.get(f"{url}/v1/probes/{probe}", headers=admin).json()
    assert pushed == 2  # the rounds train as before
    assert [(e["probe"], e["status"]) for e in answered] == [(probe, "recorded")]  # once, however many pulls
    assert kinds.index("probe") < kinds.index("round")  # answered before the first task
    assert (result["answers"], result["correct"], result["total"]) == (1, *_held_out_counts(onnx_model, shard))
    assert result["total"] == 30  # 10% of 300: the trainer's held-out slice


def test_evaluate_probe_counts_the_held_out_slice_of_the_shard(fashion_train, tmp_path, onnx_model):
    shard = write_shard(tmp_path / "s.npz", fashion_train.images[:200], fashion_train.labels[:200])

    counts = evaluate_probe(onnx_model, InputSpec(), shard, holdout_fraction=0.25)

    assert (counts.total, counts.samples) == (50, 200)
    assert (counts.correct, counts.total) == _held_out_counts(onnx_model, shard, 0.25)


def test_a_probes_only_phone_needs_no_bundle(tmp_path):
    (tmp_path / "credential.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "device_id": "p", "token": "t"}))

    loop = PhoneLoop(tmp_path, probes_only=True)  # no bundles/ folder: fine for a probes-only phone

    assert loop.bundles == {}
    with pytest.raises(FedkitError, match="no bundle"):
        PhoneLoop(tmp_path)  # a training phone still needs one
