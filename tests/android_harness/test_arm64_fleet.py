"""`fedkit simulate` with a phone group on the emulated arm64 phone beside an x86-64 one: both
train every round against the real aggregator, the arm64 phone with the numpy engine (what its
runtime has), its timeline its real emulated compute, its folder in the run folder at the end."""

from __future__ import annotations

import json

import pytest

from toolkit.errors import ConfigError
from toolkit.simulation import parse_simulation, simulate

pytestmark = pytest.mark.timeout(2400)  # a cold cache builds the rootfs first (minutes)


def config(**extra) -> dict:
    return {
        "name": "arm64-fleet",
        "model": "small_cnn",
        "train_images": 600,
        "test_images": 500,
        "partition": "iid",
        "deadline_s": 120,
        "min_reports": 2,
        "timeout_s": 600,
        "compute": "none",
        "phones": [{"class": "flagship-2023"}, {"class": "low-2022", "arch": "arm64"}],
        "stages": [{"name": "head", "rounds": 2, "lr": 0.05}],
        **extra,
    }


def test_an_arm64_group_trains_beside_an_x86_64_one(arm64_phone, tmp_path):
    summary = simulate(parse_simulation(config()), tmp_path / "run").model_dump()

    assert summary["rounds"] == 2 and summary["updates_accepted"] == 4 and summary["accepted_lost"] == 0
    _x86, arm = summary["phones"]
    assert arm["phone_class"] == "low-2022@arm64" and arm["link"].startswith("none: an arm64 phone")
    assert arm["compute_factor"] == 1.0 and arm["address_space_mb"] is None  # its real emulated compute, uncapped
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    engines = {p["profile"]: p["plan"]["engine"] for p in plan["phones"]}
    assert engines == {"flagship-2023": "ort", "low-2022@arm64": "numpy"}
    events = [
        json.loads(line) for line in (tmp_path / "run" / "phones" / "phone-2" / "events.jsonl").read_text().splitlines()
    ]
    trains = [e for e in events if e["event"] == "train"]
    assert [e["round"] for e in trains] == [1, 2] and all(e["end"] > e["start"] for e in trains)
    assert (tmp_path / "run" / "report" / "timeline.png").stat().st_size > 0


def test_an_arm64_group_runs_what_it_has():
    with pytest.raises(ConfigError, match="numpy engine"):
        parse_simulation(config(phones=[{"class": "low-2022", "arch": "arm64", "engine": "ort"}]))
