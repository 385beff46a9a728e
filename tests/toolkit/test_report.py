"""The report is rebuilt from a run folder alone: a small hand-written one here (the full
simulation is tested end to end in tests/toolkit/simulation)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.errors import FedkitError
from toolkit.report import build_report, bytes_by_round, load_run, spans
from toolkit.simulation.summary import PhoneSummary, Reference, RunSummary


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
