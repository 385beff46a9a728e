"""The federated reward (toolkit.nas.fleet): an emulated fleet (the aggregator process and three
phone processes answering probes) measures a network's accuracy on the phones' held-out slices,
exactly what ONNX Runtime gives on those slices directly."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from device_runtime.engines.inference import inference_options, load_onnxruntime
from device_runtime.local_round import load_shard
from device_runtime.preprocess import InputSpec, prepare
from device_runtime.probes import BATCH
from device_runtime.trainer import holdout_index
from toolkit.errors import FedkitError
from toolkit.nas.fleet import FleetConfig, fleet_validator, main, probe_model

PHONES = 3
SMALL_SPLIT = {"train_images": 3000, "partition": "dirichlet", "alpha": 0.5, "seed": 0}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("fleet") / "fleet"
    config = FleetConfig(phones=PHONES, deadline_s=120, poll_s=0.2)
    with fleet_validator(config, folder, shards=SMALL_SPLIT) as validator:
        yield validator, folder


def direct_accuracy(blob: bytes, folder) -> float:
    """correct / total of the model over every phone's held-out slice, run here with ONNX Runtime."""
    session = load_onnxruntime().InferenceSession(blob, inference_options(), providers=["CPUExecutionProvider"])
    correct = total = 0
    for shard in sorted(folder.glob("phones/*/shard.npz")):
        images, labels = load_shard(shard, 10)
        held = holdout_index(len(labels))
        for i in range(0, len(held), BATCH):  # the phones' batches: the same inputs to the same kernels
            idx = held[i : i + BATCH]
            logits = session.run(None, {"input": prepare(images[idx], InputSpec())})[0]
            correct += int((logits.argmax(axis=1) == labels[idx]).sum())
        total += len(held)
    return correct / total


def test_a_network_is_measured_on_every_phones_held_out_slice(fleet):
    import torch

    from toolkit.models import load_model

    validator, folder = fleet
    torch.manual_seed(0)
    model = load_model("small_cnn")

    result = validator.measure(model)

    blob, _ = probe_model(model)
    shards = [load_shard(s, 10)[1] for s in folder.glob("phones/*/shard.npz")]
    assert result.answers == PHONES
    assert result.total == sum(len(holdout_index(len(labels))) for labels in shards)
    assert result.accuracy == direct_accuracy(blob, folder)
    assert validator.accuracy_of(model) == result.accuracy  # the same file: the same probe, the same sums


def test_a_sampled_network_of_the_supernet_is_measured_as_its_standalone_network(fleet):
    from toolkit.nas.space import Supernet

    validator, folder = fleet
    supernet = Supernet()
    choice = (0, 1, 0, 1, 0, 1, 0, 1, 0)

    accuracy = validator.accuracy(supernet, choice)

    blob, _ = probe_model(supernet.network(choice))
    assert accuracy == direct_accuracy(blob, folder)
    assert 0 <= accuracy <= 1


def test_too_few_answers_by_the_deadline_fail_with_what_to_do(fleet):
    import torch

    from toolkit.models import load_model

    validator, _ = fleet
    torch.manual_seed(1)  # another model: a probe of its own
    model = load_model("small_cnn")
    before = validator.min_answers, validator.deadline_s
    validator.min_answers, validator.deadline_s = PHONES + 1, 3.0
    try:
        with pytest.raises(FedkitError, match=f"only {PHONES} of the {PHONES + 1} phones"):
            validator.measure(model)
    finally:
        validator.min_answers, validator.deadline_s = before


def test_the_fleet_section_says_what_is_missing():
    with pytest.raises(ValidationError, match="admin_token_file and min_answers"):
        FleetConfig(url="http://127.0.0.1:8443")
    with pytest.raises(ValidationError, match="more than the emulated fleet"):
        FleetConfig(phones=2, min_answers=3)
    with pytest.raises(ValidationError, match="extra"):
        FleetConfig(phone=2)
    assert np.isclose(FleetConfig().deadline_s, 300)


def test_by_hand_it_prints_the_accuracy_or_what_is_wrong(capsys):
    assert main(["small_cnn", "--phones", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("small_cnn: ") and "held-out images of 2 phones" in out

    assert main(["small_cnn", "--url", "http://127.0.0.1:1"]) == 1
    assert "give admin_token_file and min_answers" in capsys.readouterr().err
