"""A searched network deploys like a zoo model: exported to an ORT bundle, trained a round on a phone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_runtime.bundle import Bundle
from device_runtime.codec import decode
from device_runtime.engines import open_engine
from device_runtime.local_round import Task
from device_runtime.manifest import DevicePlan
from device_runtime.trainer import LocalTrainer
from exporters.bundle import export_bundle
from toolkit.data import LABEL_NAMES, transform, write_shard
from toolkit.models import load_model
from toolkit.models.saved import save_network
from toolkit.nas.space import Supernet

CHOICE = (1, 0, 0, 1, 1, 0, 1, 0, 1)  # l0.m2.m2.l0.l0.m2.l0.m2.l0: an adapter at nearly every boundary
TASK = Task(round=0, base_version=0, lr=0.05, local_epochs=1, batch_size=16, encoding="fp32", seed=0)


@pytest.fixture(scope="module")
def network(one_torch_thread, fashion_train):
    supernet = Supernet()
    supernet.init_adapters(torch.from_numpy(transform(fashion_train.images[:32])))
    save_network(supernet, CHOICE, "deploys")
    return load_model("nas:deploys")


@pytest.fixture(scope="module")
def shard(tmp_path_factory, fashion_train):
    path = tmp_path_factory.mktemp("shard") / "shard.npz"
    return write_shard(path, fashion_train.images[:48], fashion_train.labels[:48])


def test_a_saved_network_exports_and_trains_a_round_on_a_phone(network, shard, fashion_train, tmp_path):
    # Prepare: the last block (the head conv, after an adapter) and the classifier train
    end = len(network.block_names)
    plan = DevicePlan(cut=end, train_from=network.train_from(end, 2), batch_size=16)
    assert network.block_names[plan.train_from] == "l0.head"

    # Execute
    export_bundle(network, plan, tmp_path / "b", ("ort",), label_names=LABEL_NAMES)
    bundle = Bundle.load(tmp_path / "b")
    base = decode(bundle.path("weights").read_bytes()).tensors
    trainer = LocalTrainer(bundle, shard, tmp_path / "work")
    result = trainer.run_round(TASK, base)

    # Assert: the phone's model is the network; the round moved every trainable tensor
    assert bundle.manifest.model_id == "nas:deploys"
    assert set(base) == {
        "l0.head.0.weight",
        "l0.head.1.weight",
        "l0.head.1.bias",
        "classifier.weight",
        "classifier.bias",
    }
    engine = open_engine(bundle)
    engine.set_weights(base)
    with torch.no_grad():
        expected = network.forward(torch.from_numpy(transform(fashion_train.images[:8]))).numpy()
    np.testing.assert_allclose(engine.forward(trainer.features()[:8]), expected, rtol=1e-4, atol=1e-4)
    assert result.update.keys() == set(base)
    assert all(np.abs(delta).max() > 0 for delta in result.update.values())
    assert np.isfinite(result.train_loss) and result.num_samples == 44


def test_its_exit_model_exports_and_trains_every_exit(network, shard, tmp_path):
    model = load_model("nas:deploys+exits")
    end = len(model.block_names)
    plan = DevicePlan(
        cut=end, train_from=model.train_from(end, 1), batch_size=16, exits=model.exits, exit_weights=(1.0,) * 8
    )
    export_bundle(model, plan, tmp_path / "b", ("ort",), label_names=LABEL_NAMES)
    bundle = Bundle.load(tmp_path / "b")
    base = decode(bundle.path("weights").read_bytes()).tensors
    result = LocalTrainer(bundle, shard, tmp_path / "work").run_round(TASK, base)
    branches = {name.split(".")[1] for name in result.update if name.startswith("exits.")}
    assert branches == {str(p) for p in model.exits[:-1]}  # one after every stage pool
    assert all(np.abs(delta).max() > 0 for delta in result.update.values())


def test_plan_and_export_take_it_by_name(network, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.planning import load_plan
    from toolkit.profiling import DeviceProfile

    edge = tmp_path / "edge.json"
    DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000).save(edge)
    plan = tmp_path / "plan.json"
    runner = CliRunner()
    classes = "entry-2018,flagship-2024"
    args = ["plan", "--catalog", "--classes", classes, "--model", "nas:deploys+exits", "--edge", str(edge)]
    result = runner.invoke(app, [*args, "--out", str(plan)])
    assert result.exit_code == 0, result.output
    fleet = load_plan(plan)
    assert fleet.model_id == "nas:deploys+exits:3,5,8,11,15,20,22"
    cuts = {p.plan.cut for p in fleet.phones if p.plan is not None}
    assert cuts and cuts <= set(load_model(fleet.model_id).exits)
    result = runner.invoke(app, ["export", "--plan", str(plan), "--out", str(tmp_path / "bundles")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bundles" / "phones.json").is_file()
