"""A fleet plan → one verified bundle per distinct choice, and the phone → bundle index."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from device_runtime.bundle import Bundle
from device_runtime.codec import encoded_size
from device_runtime.manifest import DevicePlan
from toolkit.cli import app
from toolkit.data import LABEL_NAMES
from toolkit.errors import ExportError, PlanError
from toolkit.models import load_model
from toolkit.planning import Pin, PlanConfig, Planner
from toolkit.planning.export import cached_bundle, export_plan_bundles, read_index
from toolkit.profiling import DeviceProfile, links

EDGE = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000)


def _phone(name: str, gflops: float = 20.0, memory_mb: float = 900.0, link: str = "4g") -> DeviceProfile:
    return DeviceProfile(
        name=name,
        source="catalog",
        cpu_cores=8,
        gflops=gflops,
        memory_mb=memory_mb,
        engines=("ort",),
        link=links()[link],
        cpu_power_w=3.0,
    )


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
            planned.cut,
            planned.train_from,
            planned.encoding,
            planned.batch_size,
        )
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
    bad = fleet.model_copy(
        update={"phones": [fleet.phones[0].model_copy(update={"plan": replace(fleet.phones[0].plan, encoding="int3")})]}
    )
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


# The bundle cache (cached_bundle): each test gets a cache of its own and counts the exports
# behind it, so "reused" means "not exported again", not merely "the same bytes came out".
@pytest.fixture
def exports(tmp_path, monkeypatch) -> list[DevicePlan]:
    import exporters.bundle

    monkeypatch.setenv("FEDKIT_CACHE_DIR", str(tmp_path / "cache"))
    made = []
    real = exporters.bundle.export_bundle

    def counting(model, plan, out_dir, *args, **kwargs):
        made.append(plan)
        return real(model, plan, out_dir, *args, **kwargs)

    monkeypatch.setattr(exporters.bundle, "export_bundle", counting)
    return made


def head_plan(model, **changes) -> DevicePlan:
    n = len(model.block_names)
    return replace(DevicePlan(cut=n, train_from=model.train_from(n, 1)), **changes)


def files_and_mtimes(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_the_cache_hands_out_its_bundle_again_without_exporting(exports, one_torch_thread):
    model = load_model("small_cnn")
    plan = head_plan(model)
    first = cached_bundle(model, plan, plan.train_from)
    before = files_and_mtimes(first)

    # a fresh load of the same model (same weights, same hash), the same plan
    again = cached_bundle(load_model("small_cnn"), plan, plan.train_from)

    assert again == first
    assert exports == [plan]  # exported once, for the first call
    assert files_and_mtimes(again) == before  # not rewritten either


def test_a_fleet_exported_twice_is_exported_from_the_model_once(exports, one_torch_thread, tmp_path):
    fleet = Planner(load_model("small_cnn"), EDGE, PlanConfig(slack=0.0)).plan([_phone("a"), _phone("b")])
    one = export_plan_bundles(fleet, tmp_path / "one")
    two = export_plan_bundles(fleet, tmp_path / "two")
    assert len(exports) == len(one) == len(two) == 1  # the two phones share a bundle
    assert Bundle.load(two[0].folder).bundle_hash == Bundle.load(one[0].folder).bundle_hash


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _relabel(path):  # still a valid manifest, every file still matching it: only its hash tells
    manifest = json.loads(path.read_text())
    manifest["label_names"][0] = "not a t-shirt"
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda entry: _flip_last_byte(next(entry.glob("*.onnx"))), id="model file altered"),
        pytest.param(lambda entry: next(entry.glob("*.onnx")).unlink(), id="model file missing"),
        pytest.param(lambda entry: _relabel(entry / "manifest.json"), id="manifest edited"),
        pytest.param(lambda entry: (entry / "manifest.json").write_text("{"), id="manifest truncated"),
    ],
)
def test_a_damaged_cache_entry_is_exported_again(exports, one_torch_thread, damage):
    model = load_model("small_cnn")
    plan = head_plan(model)
    entry = cached_bundle(model, plan, plan.train_from)
    good = Bundle.load(entry).bundle_hash
    damage(entry)

    again = cached_bundle(model, plan, plan.train_from)

    assert exports == [plan, plan]  # noticed, and exported again
    assert Bundle.load(again).bundle_hash == good  # the entry is whole again, as first exported
    assert Bundle.load(again).manifest.label_names == LABEL_NAMES


def test_an_entry_of_another_export_format_is_not_reused(exports, one_torch_thread, monkeypatch):
    import exporters.bundle

    model = load_model("small_cnn")
    plan = head_plan(model)
    old = cached_bundle(model, plan, plan.train_from)

    # the exporter's files change, and with them EXPORT_FORMAT
    monkeypatch.setattr(exporters.bundle, "EXPORT_FORMAT", exporters.bundle.EXPORT_FORMAT + 1)
    new = cached_bundle(model, plan, plan.train_from)

    assert new != old and exports == [plan, plan]
    Bundle.load(new)


def test_a_plan_that_differs_only_in_local_epochs_gets_its_own_bundle(exports, one_torch_thread):
    # the phone falls back on its bundle's local_epochs when a stage does not name them
    model = load_model("small_cnn")
    one, three = head_plan(model), head_plan(model, local_epochs=3)
    cached_bundle(model, one, one.train_from)

    entry = cached_bundle(model, three, three.train_from)

    assert exports == [one, three]
    assert Bundle.load(entry).manifest.plan.local_epochs == 3


def test_an_exit_plan_exports_a_bundle_per_exit_without_a_fed_part(exports, one_torch_thread, tmp_path):
    # Prepare: three phones pinned to the three exits of small_cnn+exits:1,2, exit 1's loss halved
    model = load_model("small_cnn+exits:1,2")
    pins = {"a": Pin(cut=1), "b": Pin(cut=2), "c": Pin(cut=5)}
    fleet = Planner(model, EDGE, PlanConfig(budget_s=1e6, exit_weights={1: 0.5})).plan(
        [_phone(name) for name in pins], pins
    )

    # Execute
    bundles = export_plan_bundles(fleet, tmp_path / "out")

    # Assert: one bundle per exit, named for it and its weights; each phone's plan, verified;
    # no bundle runs a fed part, whatever the shallowest phone trains
    index = read_index(tmp_path / "out")
    assert sorted(b.folder.name for b in bundles) == [
        "exit1-from1-ort-fp32-b32-w0.5",
        "exit2-from2-ort-fp32-b32-w0.5_1",
        "exit5-from4-ort-fp32-b32-w0.5_1_1",
    ]
    for phone in fleet.phones:
        [folder] = index[phone.profile]
        manifest = Bundle.load(folder).manifest
        assert manifest.plan == replace(phone.plan, predicted={})
        assert "fed.onnx" not in manifest.files
        # the planner priced the update the bundle sends: every tensor it trains
        shapes = {t.name: t.shape for t in manifest.trainable}
        assert encoded_size(shapes, manifest.plan.encoding) == phone.plan.predicted["up_bytes"]
        assert any(name.startswith("exits.") for name in shapes)
    assert len(exports) == 3
