"""The report is rebuilt from a run folder alone: a small hand-written one here (the full
simulation is tested end to end in tests/toolkit/simulation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from toolkit.aggregator.status import BestExitModel, ExitStatus
from toolkit.cli import app
from toolkit.errors import FedkitError
from toolkit.report import build_report, bytes_by_round, exit_accuracy, load_run, spans
from toolkit.simulation.summary import ExitLogits, PhoneSummary, Reference, RunSummary


@pytest.fixture
def run_dir(tmp_path):
    RunSummary(
        name="t",
        model="small_cnn",
        mode="federated",
        depth="head",
        test_images=100,
        edge="edge: 200 GFLOP/s, pinned",
        rounds=2,
        final_accuracy=0.4,
        reference=Reference(final_accuracy=0.8, test_accuracy=[0.8], source="central.json"),
        updates_accepted=3,
        bytes_accepted=3000,
        accepted_told_phones=3,
        accepted_lost=0,
        faults=[],
        crashed_phones={},
        wall_s=10.0,
        setup_s=2.0,
        train_s=8.0,
        compute_note="host speed",
        netem=False,
        phones=[
            PhoneSummary(
                device_id=f"phone-{i}",
                phone_class=c,
                compute_factor=1.0,
                address_space_mb=None,
                link="in-process",
                samples=10,
                bundles=["b"],
                starts=1,
                exit_code=0,
                offline_windows=0,
                peak_rss_mb=80.0,
                predicted={"total": 1.5, "up_bytes": 2048.0, "down_bytes": 4096.0},
                measured_round_s=1.25,
                measured_up_bytes=1024.0,
                measured_down_bytes=4096.0,
            )
            for i, c in ((1, "fast"), (2, "slow"))
        ],
    ).save(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(m)
            for m in (
                {"version": 0, "round": None, "stage": None, "accuracy": 0.1, "updates": 0},
                {"version": 1, "round": 1, "stage": "s", "accuracy": 0.3, "updates": 2},
                {"version": 2, "round": 2, "stage": "s", "accuracy": 0.4, "updates": 1},
            )
        )
        + "\n"
    )
    events = {
        "phone-1": [
            {"t": 100.0, "event": "start"},
            {"t": 102.0, "event": "train", "start": 100.5, "end": 102.0, "round": 1},
            {
                "t": 102.5,
                "event": "upload",
                "start": 102.0,
                "end": 102.5,
                "round": 1,
                "bytes": 1000,
                "status": "accepted",
            },
            {
                "t": 104.0,
                "event": "upload",
                "start": 103.0,
                "end": 104.0,
                "round": 2,
                "bytes": 1000,
                "status": "accepted",
            },
        ],
        "phone-2": [
            {
                "t": 101.0,
                "event": "upload",
                "start": 100.0,
                "end": 101.0,
                "round": 1,
                "bytes": 1000,
                "status": "accepted",
            }
        ],
    }
    for phone, lines in events.items():
        (tmp_path / "phones" / phone).mkdir(parents=True)
        (tmp_path / "phones" / phone / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (tmp_path / "faults.jsonl").write_text(
        json.dumps({"t": 101.0, "elapsed_s": 1.0, "kind": "kill_phone", "phone": "phone-2", "detail": "SIGKILL"})
        + "\n"
        + json.dumps({"t": 103.0, "elapsed_s": 3.0, "kind": "restart", "detail": "phone-2 restarted"})
        + "\n"
    )
    return tmp_path


def test_report_has_every_plot_and_the_figures(run_dir):
    page = build_report(run_dir)
    text = page.read_text()
    for name in ("accuracy.png", "bytes.png", "timeline.png"):
        assert (run_dir / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in text
    assert "40.00 %" in text and "80.00 %" in text  # final accuracy and the reference
    assert "SIGKILL" in text
    assert "1.25 / 1.50" in text and "1 / 2" in text and "4 / 4" in text  # measured beside planned: s, KiB up, KiB down


def test_a_summary_of_another_schema_is_refused(run_dir):
    data = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**data, "schema_version": 1}))
    with pytest.raises(FedkitError, match="schema version 1"):
        build_report(run_dir)


def test_bytes_are_summed_per_class_and_round(run_dir):
    assert bytes_by_round(load_run(run_dir)) == {"fast": {1: 1000, 2: 1000}, "slow": {1: 1000}}


def test_a_killed_phone_gets_a_killed_span_until_its_restart(run_dir):
    killed = [s for s in spans(load_run(run_dir))["phone-2"] if s[0] == "killed"]
    assert killed == [("killed", 1.0, 3.0)]  # seconds from the first event (t = 100)


def test_cli_rebuilds_the_report(run_dir):
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report" / "index.html").is_file()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FedkitError, match=r"summary\.json"):
        build_report(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1


@pytest.fixture
def exit_run_dir(run_dir):
    """run_dir as a small_cnn+exits:1,2 run: metrics per exit, the plan's exits, the aggregator's
    best exit-point model and the final model's test logits."""
    summary = RunSummary.load(run_dir)
    best = BestExitModel(
        version=1,
        round=1,
        mean_accuracy=0.3,
        loss=6.5,
        exits=[ExitStatus(position=p, accuracy=a, loss=2.0) for p, a in ((1, 0.2), (2, 0.3), (5, 0.4))],
        evaluated=3,
    )
    summary.model_copy(update={"model": "small_cnn+exits:1,2", "best_exit": best}).save(run_dir)
    (run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "version": v,
                    "round": v or None,
                    "accuracy": final,
                    "updates": 1,
                    "exit_accuracy": {"1": early, "2": middle, "5": final},
                    "exit_loss": {"1": 2.0, "2": 2.0, "5": 2.0},
                    "loss": 6.0,
                }
            )
            + "\n"
            for v, early, middle, final in ((0, 0.1, 0.1, 0.1), (1, 0.2, 0.3, 0.4), (2, 0.25, 0.29, 0.38))
        )
    )
    plan = {"profile": "fast", "reason": "r", "plan": {"cut": 5, "train_from": 2, "exits": [1, 2, 5]}}
    weak = {"profile": "slow", "reason": "r", "plan": {"cut": 2, "train_from": 2, "exits": [1, 2]}}
    (run_dir / "plan.json").write_text(json.dumps({"phones": [plan, weak]}))
    # 4 images: exit 1 is sure and right on images 0-1, exit 2 sure and right on image 2, the
    # final exit right on all but image 3
    labels = np.array([0, 1, 2, 3])
    logits = np.zeros((4, 3, 10), np.float32)
    logits[[0, 1], 0, [0, 1]] = 20.0
    logits[2, 1, 2] = 20.0
    logits[np.arange(4), 2, [0, 1, 2, 4]] = 1.0
    ExitLogits(2, np.array([1, 2, 5]), np.array([10_000_000, 30_000_000, 60_000_000]), 50_000_000, logits, labels).save(
        run_dir
    )
    return run_dir


def test_an_exit_runs_report_has_the_exit_sections(exit_run_dir):
    page = build_report(exit_run_dir)
    text = page.read_text()
    for name in ("exit_accuracy.png", "early_exit.png"):
        assert (exit_run_dir / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in text
    assert "<h2>Exits</h2>" in text and "Exits at positions 1, 2, 5" in text
    # accuracy per exit per round: version 1's row
    assert "<tr><td>1</td><td>20.00 %</td><td>30.00 %</td><td>40.00 %</td></tr>" in text
    # each phone's exit, with its class, held exits and train_from
    assert "<tr><td>phone-1</td><td>fast</td><td>5</td><td>1, 2, 5</td><td>2</td></tr>" in text
    assert "<tr><td>phone-2</td><td>slow</td><td>2</td><td>1, 2</td><td>2</td></tr>" in text
    # the best exit-point model
    assert "Version 1 (round 1) of 3 evaluated per exit: mean exit accuracy 30.00 %, total loss 6.5000" in text
    # the curve: the final exit alone (3 of 4 right at 50 MFLOPs), and at max softmax 0.9 images 0-2 leave
    # early (at 10, 10, 30 MFLOPs), image 3 at the final exit (60): 3 of 4 right, 27.5 MFLOPs, 45 % fewer
    assert "<tr><td>final exit alone</td><td>–</td><td>75.00 %</td><td>50.00</td>" in text
    assert "<tr><td>max_softmax</td><td>0.9</td><td>75.00 %</td><td>27.50</td><td>+0.00</td><td>-45.0 %</td>" in text
    assert "<td>50 / 25 / 25</td>" in text  # the share of images leaving at each exit


def test_the_early_exit_curve_is_early_exit_curves(exit_run_dir):
    from device_runtime.early_exit import early_exit_curve

    run = load_run(exit_run_dir)
    logits = run["exit_logits"]
    assert run["early_exit"]["entropy"] == early_exit_curve(logits.logits, logits.labels, logits.flops, None, "entropy")
    (alone,) = run["early_exit"]["final exit alone"]
    assert (alone.threshold, alone.accuracy, alone.mean_mflops) == (None, 0.75, 50.0)
    assert exit_accuracy(run) == {
        1: [(0, 0.1), (1, 0.2), (2, 0.25)],
        2: [(0, 0.1), (1, 0.3), (2, 0.29)],
        5: [(0, 0.1), (1, 0.4), (2, 0.38)],
    }


def test_a_run_without_exits_has_no_exit_section(run_dir):
    text = build_report(run_dir).read_text()
    assert "Exits" not in text and not (run_dir / "report" / "exit_accuracy.png").exists()
