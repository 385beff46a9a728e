"""fedkit status, enrol-token, export-global and serve's error path, through typer's CliRunner."""

import numpy as np
import pytest
import torch
from aggregator_helpers import Clock, enrol
from typer.testing import CliRunner

from device_runtime.codec import UpdateHeader, encode
from toolkit.aggregator import global_state_dict, parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.store import Store
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
