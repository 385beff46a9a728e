"""A fleet plan → one verified bundle per distinct choice, and the phone → bundle index."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from device_runtime.bundle import Bundle
from toolkit.cli import app
from toolkit.models import load_model
from toolkit.planning import PlanConfig, Planner
from toolkit.profiling import DeviceProfile, links

EDGE = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000)


def _phone(name: str, gflops: float = 20.0, memory_mb: float = 900.0, link: str = "4g") -> DeviceProfile:
    return DeviceProfile(name=name, source="catalog", cpu_cores=8, gflops=gflops, memory_mb=memory_mb,
                         engines=("ort",), link=links()[link], cpu_power_w=3.0)


def test_export_from_a_plan_writes_one_bundle_per_choice_and_the_phone_index(tmp_path):
    # Prepare: two phones alike, one weak phone on a fast link, one phone nothing fits
    fleet = Planner(load_model("small_cnn"), EDGE, PlanConfig(slack=0.0)).plan(
        [_phone("a"), _phone("b"), _phone("c", gflops=0.5, link="wifi"), _phone("x", memory_mb=5)]
    )
    fleet.save(tmp_path / "plan.json")

    # Execute
    result = CliRunner().invoke(app, ["export", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out")])

    # Assert
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "phones.json").read_text())
    assert set(index) == {"a", "b", "c"}  # the infeasible phone gets no bundle
    assert index["a"] == index["b"]
    by_phone = {p.profile: p.plan for p in fleet.phones}
    for phone, folder in index.items():
        manifest = Bundle.load(tmp_path / "out" / folder).manifest  # verifies every hash
        assert (manifest.plan.cut, manifest.plan.train_from) == (by_phone[phone].cut, by_phone[phone].train_from)
    assert "no bundle for x" in result.output


def test_export_from_a_missing_plan_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["export", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")])

    assert result.exit_code == 1
    assert "fedkit plan" in result.output
    assert not (tmp_path / "out").exists()
