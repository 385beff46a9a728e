"""fedkit status, enrol-token, export-global and serve's error path, through typer's CliRunner."""

import numpy as np
import pytest
import torch
from aggregator_helpers import Clock, enrol
from typer.testing import CliRunner

from device_runtime.codec import UpdateHeader, encode
from toolkit.aggregator import global_state_dict, parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.store import ExitScore, Store
from toolkit.cli import app
from toolkit.models import load_model

runner = CliRunner()
HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture
def small_run(tmp_path):
    """A small_cnn run with one aggregated round of head updates."""
    state = load_model("small_cnn").root.state_dict()
    head = {name: state[name].numpy() for name in HEAD}
    (tmp_path / "weights.bin").write_bytes(encode(UpdateHeader("init", 0, 0, 1, kind="weights"), head, "fp32"))
    config = parse_config(
        {
            "name": "cli",
            "weights": "weights.bin",
            "model": "small_cnn",
            "stages": [{"name": "head", "rounds": 3, "lr": 0.1}],
        },
        tmp_path,
    )
    co = Coordinator(config, Store(config.default_db()), Clock())
    co.start()
    enrol(co, "a")
    co.task_for("a")
    step = {name: np.full(t.shape, 0.25, np.float32) for name, t in head.items()}
    assert co.push("a", "k", encode(UpdateHeader("a", 1, 0, 20), step, "fp32"), 0.6).status == "accepted"
    co.store.close()
    return config.default_db(), head


def test_status_shows_stage_round_reports_accuracy_and_bytes(small_run):
    db, _ = small_run
    result = runner.invoke(app, ["status", "--db", str(db)])
    assert result.exit_code == 0, result.output
    for text in ("run cli (fedavg)", "stage head (1 of 1), round 2", "60.00%", "updates accepted", "last rounds"):
        assert text in result.output


def test_enrol_token_prints_tokens_that_enrol(small_run, tmp_path):
    db, _ = small_run
    result = runner.invoke(app, ["enrol-token", "--db", str(db), "--count", "2"])
    tokens = result.output.split()
    assert result.exit_code == 0 and len(tokens) == 2
    store = Store(db)
    assert store.enrol(tokens[0], "new-phone", "cred", 1.0) == "new-phone"


def test_export_global_merges_the_version_into_the_models_state_dict(small_run, tmp_path):
    db, head = small_run
    out = tmp_path / "global.pt"
    result = runner.invoke(app, ["export-global", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    state = torch.load(out)
    original = load_model("small_cnn").root.state_dict()
    assert state.keys() == original.keys()
    for name in HEAD:
        np.testing.assert_allclose(state[name].numpy(), head[name] + 0.25, rtol=1e-6)
    torch.testing.assert_close(state["features.0.0.weight"], original["features.0.0.weight"])
    model = load_model("small_cnn").root
    model.load_state_dict(global_state_dict(db, version=1))  # loads into the real model
    np.testing.assert_allclose(global_state_dict(db, version=0)["classifier.bias"].numpy(), head["classifier.bias"])


def test_export_global_refuses_a_model_that_does_not_fit(small_run):
    db, _ = small_run
    result = runner.invoke(app, ["export-global", "--db", str(db), "--out", "x.pt", "--model", "mobilenet_v2"])
    assert result.exit_code == 1 and "does not fit model" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["status", "--db", "nowhere.sqlite"], "no aggregator database"),
        (["serve", "--config", "missing.toml"], "does not exist"),
    ],
)
def test_failures_are_one_line_and_exit_1(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and message in result.output


@pytest.fixture
def exit_run(tmp_path):
    """A small_cnn+exits:2 run (the exit's branch and the classifier train) with two aggregated
    rounds, both evaluated per exit: version 1 is the best exit-point model."""
    model = load_model("small_cnn+exits:2")
    state = model.root.state_dict()
    trained = {name: state[name].numpy() for name in state if name.startswith(("exits.2.", "classifier."))}
    (tmp_path / "weights.bin").write_bytes(encode(UpdateHeader("init", 0, 0, 1, kind="weights"), trained, "fp32"))
    config = parse_config(
        {
            "name": "exits",
            "weights": "weights.bin",
            "model": model.model_id,
            "fedavg": {"min_reports": 1},
            "stages": [{"name": "all", "rounds": 2, "lr": 0.1}],
        },
        tmp_path,
    )
    co = Coordinator(config, Store(config.default_db()), Clock())
    co.start()
    enrol(co, "a")
    for round_ in (1, 2):
        co.task_for("a")
        step = {name: np.full(t.shape, 0.25 * round_, np.float32) for name, t in trained.items()}
        header = UpdateHeader("a", round_, round_ - 1, 20)
        assert co.push("a", f"k{round_}", encode(header, step, "fp32"), None).status == "accepted"
    for version, early, final, loss in ((1, 0.61, 0.72, 1.5), (2, 0.55, 0.70, 1.2)):
        assert co.record_evaluation(version, final, "test", loss, (ExitScore(2, early, 0.5), ExitScore(5, final, 1.0)))
    co.store.close()
    return config.default_db(), trained


def test_status_shows_the_best_exit_point_model_per_exit(exit_run):
    db, _ = exit_run
    result = runner.invoke(app, ["status", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "best exit-point model" in result.output
    assert "version 1: 66.50% mean over exits, loss 1.5000" in result.output
    assert "best model, per exit" in result.output
    assert ["│", "versions", "evaluated", "per", "exit", "│", "2", "│"] in [
        line.split() for line in result.output.splitlines()
    ]
    rows = [line.split() for line in result.output.splitlines() if "61.00%" in line or "72.00%" in line]
    assert ["│", "2", "│", "61.00%", "│", "0.5000", "│"] in rows and [
        "│",
        "5",
        "│",
        "72.00%",
        "│",
        "1.0000",
        "│",
    ] in rows


def test_status_of_a_run_without_exit_figures_shows_no_best(small_run):
    db, _ = small_run
    result = runner.invoke(app, ["status", "--db", str(db)])
    assert result.exit_code == 0 and "best exit-point model" not in result.output


def test_export_global_best_writes_the_best_version(exit_run, tmp_path):
    db, trained = exit_run
    out = tmp_path / "best.pt"
    result = runner.invoke(app, ["export-global", "--db", str(db), "--out", str(out), "--best", "--test-images", "0"])
    assert result.exit_code == 0, result.output
    state = torch.load(out)
    for name, initial in trained.items():  # version 1: the initial tensors plus round 1's step, not round 2's too
        np.testing.assert_allclose(state[name].numpy(), initial + 0.25, rtol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--best", "--version", "2"], "--best and --version both choose the version"),
        (["--best"], "no model version in"),
    ],
)
def test_export_global_best_needs_exit_figures_and_no_version(small_run, tmp_path, args, message):
    db, _ = small_run
    result = runner.invoke(app, ["export-global", "--db", str(db), "--out", str(tmp_path / "x.pt"), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "x.pt").exists()
