"""A run on disk from a fleet plan: run.toml and version 0."""

from __future__ import annotations

from device_runtime.codec import decode
from toolkit.models import load_model
from toolkit.planning import Pin, PlanConfig, Planner
from toolkit.profiling import DeviceProfile, links
from toolkit.runs import WEIGHTS, has_splitfed, run_config, write_run

EDGE = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000)


def _phone(name: str) -> DeviceProfile:
    return DeviceProfile(
        name=name, source="catalog", cpu_cores=8, gflops=20.0, memory_mb=900.0, engines=("ort",), link=links()["4g"]
    )


def test_an_exit_runs_version_0_holds_every_branch_and_the_blocks_from_its_one_depth_on(tmp_path):
    # Prepare: phones at exits 1 and 2 only, in a run training its last two parameterised blocks
    model = load_model("small_cnn+exits:1,2")
    pins = {"a": Pin(cut=1), "b": Pin(cut=2)}
    fleet = Planner(model, EDGE, PlanConfig(budget_s=1e6, train_blocks=2)).plan([_phone(n) for n in pins], pins)
    assert [p.plan.train_from for p in fleet.phones] == [1, 2]  # the premise: both before T

    # Execute
    write_run(run_config(fleet, "exits", [{"name": "s", "rounds": 1, "lr": 0.01}]), fleet, tmp_path / "run")

    # Assert: not the blocks [1, T) no phone trains, but every branch, and blocks [T, n) for
    # whoever trains them in a later plan of the same run
    tensors = decode((tmp_path / "run" / WEIGHTS).read_bytes()).tensors
    modules = (*model.block_names, "exits.1", "exits.2")
    owners = {m for name in tensors for m in modules if name.startswith(m + ".")}
    assert owners == {"features.2", "classifier", "exits.1", "exits.2"}
    state = model.root.state_dict()
    assert all((state[name].numpy() == value).all() for name, value in tensors.items())
    assert not has_splitfed(fleet)  # an exit is not a cut: nothing runs past it
