"""DeviceProfile: JSON round trip and the errors a bad file gets."""

from __future__ import annotations

import json

import pytest

from toolkit.errors import PlanError
from toolkit.profiling import BlockTiming, DeviceProfile, Link, load_profiles


def _profile(**changes) -> DeviceProfile:
    fields = dict(
        name="phone-a",
        source="adb",
        cpu_cores=8,
        gflops=20.5,
        kernel_gflops={"conv": 20.5, "depthwise": 2.0},
        memory_mb=900,
        engines=("ort",),
        link=Link(uplink_mbps=9, downlink_mbps=30, rtt_ms=40),
        block_timings=(BlockTiming(model_id="small_cnn", batch=32, seconds={"features.0": 0.001}),),
    )
    return DeviceProfile(**{**fields, **changes})


def test_round_trip_keeps_every_field(tmp_path):
    profile = _profile()
    profile.save(tmp_path / "a.json")

    loaded = DeviceProfile.load(tmp_path / "a.json")

    assert loaded == profile
    assert json.loads((tmp_path / "a.json").read_text())["schema_version"] == 1
    assert loaded.timing("small_cnn").seconds == {"features.0": 0.001}
    assert loaded.timing("mobilenet_v2") is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"gflops": -1}, "gflops"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"engines": ["tflite"]}, "engines"),
        ({"source": "guess"}, "source"),
        ({"surprise": 1}, "surprise"),
        ({"link": {"uplink_mbps": 0, "downlink_mbps": 1, "rtt_ms": 1}}, "link.uplink_mbps"),
    ],
)
def test_invalid_fields_are_named(tmp_path, change, field):
    data = {**json.loads(_profile().model_dump_json()), **change}
    (tmp_path / "bad.json").write_text(json.dumps(data))

    with pytest.raises(PlanError, match=rf"bad.json is invalid: {field}"):
        DeviceProfile.load(tmp_path / "bad.json")


def test_other_schema_version_is_refused(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({**json.loads(_profile().model_dump_json()), "schema_version": 7}))

    with pytest.raises(PlanError, match=r"schema version 7.*re-run `fedkit profile`"):
        DeviceProfile.load(tmp_path / "old.json")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist: run `fedkit profile`"):
        DeviceProfile.load(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="not readable JSON"):
        DeviceProfile.load(tmp_path / "junk.json")


def test_load_profiles_reads_a_folder_in_name_order(tmp_path):
    _profile(name="b").save(tmp_path / "b.json")
    _profile(name="a").save(tmp_path / "a.json")

    assert [p.name for p in load_profiles(tmp_path)] == ["a", "b"]
    with pytest.raises(PlanError, match="holds no"):
        load_profiles(tmp_path / "empty")


@pytest.mark.parametrize("source", ["local", "adb"])
def test_measured_profile_listing_executorch_is_refused(tmp_path, source):
    # probe v1 listed executorch wherever its package was installed; a Python phone cannot run it
    data = {**json.loads(_profile(source=source).model_dump_json()), "engines": ["ort", "executorch"]}
    (tmp_path / "old.json").write_text(json.dumps(data))

    with pytest.raises(PlanError, match=r"cannot list executorch.*re-run `fedkit profile`"):
        DeviceProfile.load(tmp_path / "old.json")


def test_catalogue_profile_may_list_executorch():
    # a class assumed to run a native app with ExecuTorch's TrainingModule
    assert _profile(source="catalog", engines=("executorch",)).engines == ("executorch",)
