"""A fleet plan → one verified bundle per distinct choice, and the phone → bundle index."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from typer.testing import CliRunner

from device_runtime.bundle import Bundle
from toolkit.cli import app
from toolkit.models import load_model
from toolkit.errors import ExportError, PlanError
from toolkit.planning import PlanConfig, Planner
from toolkit.planning.export import cached_bundle, export_plan_bundles, read_index
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
    for phone, folders in index.items():
        manifest = Bundle.load(tmp_path / "out" / folders[0]).manifest  # verifies every hash
        planned = by_phone[phone]
        assert (manifest.plan.cut, manifest.plan.train_from, manifest.plan.encoding, manifest.plan.batch_size) == (
            planned.cut, planned.train_from, planned.encoding, planned.batch_size)
    assert "no bundle for x" in result.output


def test_stage_depths_give_whole_model_phones_a_shallower_bundle_too(tmp_path):
    # Prepare: a phone planned to train deeper than the classifier, and a stage depth of 1
    model = load_model("small_cnn")
    fleet = Planner(model, EDGE, PlanConfig(slack=1.0, mode="federated", stage_depths=(1,))).plan([_phone("a")])
    planned = fleet.phones[0].plan
    assert planned.train_from < model.train_from(len(model.block_names), 1)

    # Execute
    index = read_index(export_plan_bundles(fleet, tmp_path / "out")[0].folder.parent)

    # Assert: its own bundle first, then the head-only one, both verified
    own, head = (Bundle.load(folder).manifest.plan for folder in index["a"])
    assert own.train_from == planned.train_from
    assert head.train_from == model.train_from(len(model.block_names), 1) and head.encoding == planned.encoding


def test_a_plan_is_checked_whole_before_anything_is_exported_and_the_cache_is_reused(tmp_path, monkeypatch):
    fleet = Planner(load_model("small_cnn"), EDGE, PlanConfig(slack=0.0)).plan([_phone("a")])
    bad = fleet.model_copy(update={"phones": [fleet.phones[0].model_copy(
        update={"plan": replace(fleet.phones[0].plan, encoding="int3")})]})
    with pytest.raises(PlanError, match="int3"):
        export_plan_bundles(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))

    # a second export copies the cached bundle; a damaged cache entry is exported again
    first = export_plan_bundles(fleet, tmp_path / "one")[0]
    cached = cached_bundle(load_model("small_cnn"), first.plan, first.plan.train_from)
    victim = next(cached.glob("*.onnx"))
    victim.write_bytes(b"damaged")
    second = export_plan_bundles(fleet, tmp_path / "two")[0]
    assert Bundle.load(second.folder).bundle_hash == Bundle.load(first.folder).bundle_hash
    Bundle.load(cached)  # repaired
    with pytest.raises(ExportError, match="already exists"):
        export_plan_bundles(fleet, tmp_path / "two")


def test_export_from_a_missing_plan_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["export", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")])

    assert result.exit_code == 1
    assert "fedkit plan" in result.output
    assert not (tmp_path / "out").exists()
