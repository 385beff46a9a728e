"""End to end: emulated phone processes against the real aggregator on loopback (small_cnn,
4 phones, 3 rounds), healthy, with the aggregator killed mid-round, and with --netem as root."""

from __future__ import annotations

import json
import os

import pytest

from toolkit.simulation import parse_simulation, simulate


def small_config(**extra) -> dict:
    return {
        "name": "small",
        "model": "small_cnn",
        "train_blocks": 4,  # every block: small_cnn has no pretrained backbone to freeze
        "train_images": 2000,
        "test_images": 1000,
        "partition": "iid",
        "deadline_s": 60,
        "timeout_s": 240,
        "phones": [{"class": "flagship-2023", "count": 2}, {"class": "low-2022", "count": 2}],
        "stages": [{"name": "all", "rounds": 3, "lr": 0.05}],
        **extra,
    }


def run(tmp_path, **extra) -> dict:
    import torch

    torch.manual_seed(0)  # small_cnn's backbone comes from torch's global generator
    return simulate(parse_simulation(small_config(**extra)), tmp_path / "run").model_dump()


def check_finished(summary: dict, run_dir) -> None:
    assert summary["rounds"] == 3
    assert summary["final_accuracy"] > 0.15  # chance is 0.10
    assert summary["accepted_lost"] == 0
    assert summary["updates_accepted"] >= 3 * 1  # min_reports per round at least
    for name in ("index.html", "accuracy.png", "bytes.png", "timeline.png"):
        assert (run_dir / "report" / name).stat().st_size > 0
    for name in ("config.json", "plan.json", "metrics.jsonl", "aggregator.sqlite", "summary.json"):
        assert (run_dir / name).is_file()
    versions = [json.loads(line)["version"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert versions == [0, 1, 2, 3]


def test_small_federation_completes_above_chance_with_a_report(tmp_path):
    summary = run(tmp_path)
    check_finished(summary, tmp_path / "run")
    assert summary["updates_accepted"] == 12  # every phone reports every round
    assert all(p["exit_code"] == 0 and p["starts"] == 1 for p in summary["phones"])
    assert {p["link"] for p in summary["phones"]} == {"in-process"}
    factors = {p["phone_class"]: p["compute_factor"] for p in summary["phones"]}
    assert factors["flagship-2023"] == 1.0 and factors["low-2022"] > 2.5  # 100.4 / 38.4 GFLOP/s


def test_aggregator_killed_mid_round_loses_no_accepted_update(tmp_path):
    summary = run(
        tmp_path,
        faults=[
            {"kind": "kill_aggregator", "round": 2, "after_s": 0.0, "down_s": 1.5},
            {"kind": "duplicate_pushes", "phone": "phone-2"},
        ],
    )
    check_finished(summary, tmp_path / "run")
    kinds = [f["kind"] for f in summary["faults"]]
    assert "kill_aggregator" in kinds and "restart" in kinds
    uploads = [json.loads(line) for line in (tmp_path / "run/phones/phone-2/events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "upload" for e in uploads)


def test_phone_killed_mid_training_resumes_over_a_lossy_link_with_churn(tmp_path):
    churning = [
        {"class": "flagship-2023", "count": 2},
        {"class": "low-2022", "count": 2, "churn_online_s": 3, "churn_offline_s": 1},
    ]
    summary = run(
        tmp_path,
        phones=churning,
        # from round 1: a small_cnn round can start and finish between two polls of the
        # fleet, and the kill then waits for the next round; three rounds, three chances
        faults=[
            {"kind": "kill_phone", "phone": "phone-3", "round": 1, "after_s": 0.0, "down_s": 0.5},
            {"kind": "link", "after_s": 0.0, "duration_s": 10.0, "delay_ms": 50, "loss": 0.2},
        ],
    )
    check_finished(summary, tmp_path / "run")
    phone = next(p for p in summary["phones"] if p["device_id"] == "phone-3")
    assert phone["starts"] == 2 and phone["exit_code"] == 0
    assert all(p["offline_windows"] > 0 for p in summary["phones"] if p["phone_class"] == "low-2022")
    assert any(e["kind"] == "kill_phone" for e in summary["faults"])


@pytest.mark.skipif(os.geteuid() != 0, reason="--netem needs root to create network namespaces and tc qdiscs")
def test_netem_run_shapes_links_with_namespaces_and_cleans_up(tmp_path):
    import subprocess

    summary = run(tmp_path, netem=True)
    check_finished(summary, tmp_path / "run")
    assert all(p["link"].startswith("netns + tc tbf") for p in summary["phones"])
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"fk-{os.getpid():x}"[-5:] not in left


def test_cli_simulate_shows_the_last_round_and_where_the_report_is(tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "tiny"\nmodel = "small_cnn"\ntrain_blocks = 4\n'
        'train_images = 600\ntest_images = 300\npartition = "iid"\n'
        "deadline_s = 60\ntimeout_s = 240\n"
        '[[phones]]\nclass = "flagship-2023"\ncount = 2\n'
        '[[stages]]\nname = "all"\nrounds = 1\nlr = 0.05\n'
    )
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "1 rounds in" in result.output and "2 updates accepted, 0 lost" in result.output
    assert "report written" in result.output and "writing the report" not in result.output.split("report written")[-1]
    assert (tmp_path / "run" / "report" / "index.html").is_file()


def test_an_exit_federation_trains_each_phone_to_its_exit_and_leaves_out_who_is_told(tmp_path):
    # Prepare: small_cnn with exits after blocks 0 and 1; a flagship and a weak phone, whose
    # round budget only allows the weak one its first exit, and a left-out group of one
    config = {
        **small_config(),
        "model": "small_cnn+exits:1,2",
        "planner_slack": 0.3,
        "phones": [
            {"class": "flagship-2023", "count": 1},
            {"class": "entry-2018", "count": 1},
            {"class": "low-2022", "count": 1, "left_out": True},
        ],
        "memory_cap": False,
    }
    import torch

    torch.manual_seed(0)

    # Execute
    summary = simulate(parse_simulation(config), tmp_path / "run").model_dump()

    # Assert: both phones trained every round, each at its planned exit, the left-out one never
    # ran (its shard is written: the split is the whole fleet's); every exit was evaluated
    run_dir = tmp_path / "run"
    plan = {p["profile"]: p["plan"] for p in json.loads((run_dir / "plan.json").read_text())["phones"]}
    assert plan["flagship-2023"]["cut"] == 5 and plan["entry-2018"]["cut"] < 5
    assert "low-2022" not in plan
    assert summary["updates_accepted"] == 6
    assert sorted(p["device_id"] for p in summary["phones"]) == ["phone-1", "phone-2"]
    assert (run_dir / "shards" / "phone-3.npz").is_file() and not (run_dir / "phones" / "phone-3").exists()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(last["exit_accuracy"]) == {"1", "2", "5"}
    assert summary["best_exit"] is not None
