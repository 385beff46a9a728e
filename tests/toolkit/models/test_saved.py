from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from device_runtime.bundle import sha256_file
from toolkit.errors import ConfigError, ModelError
from toolkit.models import load_model
from toolkit.models.saved import ARCHITECTURE_FILE, WEIGHTS_FILE, load_saved, models_dir, save_network
from toolkit.nas.space import Supernet
from toolkit.simulation import parse_simulation

CHOICE = (0, 0, 1, 1, 0, 1, 0, 1, 0)  # m2.m2.l0.l0.m2.l0.m2.l0.m2
SIM = {"name": "x", "phones": [{"class": "mid-2022", "count": 2}], "stages": [{"name": "s", "rounds": 1, "lr": 0.01}]}


@pytest.fixture(scope="module")
def supernet(one_torch_thread, fashion_train):
    from toolkit.data import transform

    net = Supernet()
    net.init_adapters(torch.from_numpy(transform(fashion_train.images[:32])))
    with torch.no_grad():  # weights the pretrained ones are not: the saved copy must carry them
        net.classifier.weight.mul_(3.0)
        net.adapter(1, 0, 1).bias.add_(0.1)
    return net


@pytest.fixture(scope="module")
def saved(supernet):
    return save_network(supernet, CHOICE, "mixed", extra={"reward": 0.875})


def test_a_saved_network_loads_by_name_with_its_weights(supernet, saved):
    assert saved == models_dir() / "mixed"  # the session's folder (tests/conftest.py)
    model = load_model("nas:mixed")
    assert model.model_id == "nas:mixed"
    assert model.block_names == supernet.block_names(CHOICE)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward(x), supernet(x, CHOICE), rtol=0, atol=0)
    architecture = json.loads((saved / ARCHITECTURE_FILE).read_text())
    assert architecture["families"] == ["mobilenet_v2", "efficientnet_lite0"]
    assert architecture["choice"] == list(CHOICE)
    assert architecture["arch_id"] == "m2.m2.l0.l0.m2.l0.m2.l0.m2"
    assert architecture["blocks"] == model.block_names
    assert architecture["params"] == supernet.params(CHOICE) == sum(p.numel() for p in model.root.parameters())
    assert architecture["flops"] == supernet.flops(CHOICE) == sum(s.flops for s in model.stats)
    assert architecture["num_classes"] == 10
    assert architecture["weights_sha256"] == sha256_file(saved / WEIGHTS_FILE)
    assert architecture["extra"] == {"reward": 0.875}
    assert any("adapter" in line for line in architecture["description"])


def test_another_number_of_classes_gets_a_fresh_head(saved):
    model = load_model("nas:mixed", num_classes=4)
    assert model.root.classifier.weight.shape == (4, 1280)
    torch.testing.assert_close(
        model.root.classifier.weight, load_model("nas:mixed", num_classes=4).root.classifier.weight
    )


def test_exits_default_to_the_end_of_every_stage_pool(supernet, saved):
    model = load_model("nas:mixed+exits")
    names = model.block_names
    # after stage1 … stage7's last block, before any adapter; not after the stem or the head conv
    ends = [max(i for i, n in enumerate(names) if n.startswith(f"{f}.stage{s}.")) + 1
            for s, f in zip(range(1, 8), ["m2", "l0", "l0", "m2", "l0", "m2", "l0"], strict=True)]  # fmt: skip
    assert ends == [2, 5, 7, 12, 16, 20, 22]
    assert model.exits == (*ends, len(names))
    assert model.model_id == "nas:mixed+exits:2,5,7,12,16,20,22"
    assert names[ends[2]] == "adapters.3.l0_m2"  # the exit reads stage3's own output
    assert load_model("nas:mixed+exits:7,16").exits == (7, 16, len(names))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.exit_part(0, len(names))(x)
    assert logits.shape == (2, 8, 10)


def test_a_corrupt_or_missing_weights_file_is_refused(saved, tmp_path):
    copy = tmp_path / "mixed"
    shutil.copytree(saved, copy)
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"weights.pt has sha256 .* records .*corrupt or not this network's"):
        load_saved("mixed", tmp_path)
    (copy / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match=r"weights.pt is missing: search again"):
        load_saved("mixed", tmp_path)
    (copy / ARCHITECTURE_FILE).write_text('{"name": "mixed"}')
    with pytest.raises(ModelError, match=r"not a saved network's description \(.*families"):
        load_saved("mixed", tmp_path)


def test_an_unknown_or_bad_name_is_refused(saved):
    with pytest.raises(ModelError, match=r"no saved network 'nope' in .*saved there: mixed; run `fedkit search"):
        load_model("nas:nope")
    with pytest.raises(ModelError, match=re.escape("network name '../mixed'")):
        load_model("nas:../mixed")


def test_simulation_configs_take_the_lite_models_and_saved_networks(saved):
    assert parse_simulation({**SIM, "model": "efficientnet_lite1"}).model == "efficientnet_lite1"
    assert parse_simulation({**SIM, "model": "nas:mixed+exits"}).has_exits
    with pytest.raises(ConfigError, match=re.escape("no saved network 'nope'")):
        parse_simulation({**SIM, "model": "nas:nope"})
    with pytest.raises(ConfigError, match=re.escape("or nas:NAME (a searched network)")):
        parse_simulation({**SIM, "model": "efficientnet_b0"})
