"""fedkit export-global --early-exit and fedkit predict --early-exit, through typer's CliRunner:
the run's global tensors merged into its exit model reach the phone's early-exit folder, and
predict prints the accuracy-vs-compute curve against the final exit alone."""

import re

import numpy as np
import pytest
import torch
from early_exit_helpers import MODEL_ID, torch_logits
from typer.testing import CliRunner

from device_runtime.codec import UpdateHeader, encode
from device_runtime.early_exit import EarlyExitPredictor
from toolkit.aggregator import parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.store import Store
from toolkit.cli import app
from toolkit.models import load_model

runner = CliRunner()


def _run_db(folder, model_id: str, tensors: dict[str, np.ndarray]):
    """The database of a run of ``model_id`` whose version 0 is ``tensors``."""
    (folder / "weights.bin").write_bytes(encode(UpdateHeader("init", 0, 0, 1, kind="weights"), tensors, "fp32"))
    config = parse_config(
        {"name": "ee", "weights": "weights.bin", "model": model_id, "stages": [{"name": "s", "rounds": 1, "lr": 0.1}]},
        folder,
    )
    Coordinator(config, Store(config.default_db()), lambda: 1e6).start()
    return config.default_db()


@pytest.fixture
def exit_run(tmp_path):
    """A run of small_cnn+exits:1,2 whose global branches, head and last conv block differ from the zoo's."""
    rng = np.random.default_rng(0)
    state = load_model(MODEL_ID).root.state_dict()
    tensors = {
        name: (t.numpy() + rng.standard_normal(t.shape)).astype(np.float32)
        for name, t in state.items()
        if name.startswith(("exits.", "classifier.", "features.2.0."))
    }
    return _run_db(tmp_path, MODEL_ID, tensors), tensors


def test_export_global_writes_the_global_exit_model_as_an_early_exit_folder(exit_run, tmp_path, fashion_test):
    # Prepare
    db, tensors = exit_run
    out = tmp_path / "ee"

    # Execute
    result = runner.invoke(app, ["export-global", "--db", str(db), "--early-exit", str(out), "--test-images", "0"])

    # Assert
    assert result.exit_code == 0, result.output
    assert "early-exit folder written" in result.output and not (tmp_path / "global.pt").exists()
    model = load_model(MODEL_ID)
    model.root.load_state_dict({**model.root.state_dict(), **{k: torch.from_numpy(v) for k, v in tensors.items()}})
    images = fashion_test.images[:64]
    predictor = EarlyExitPredictor(out)
    assert predictor.index.exits == (1, 2, 5) and predictor.index.model_hash == model.content_hash()
    np.testing.assert_allclose(predictor.logits(images), torch_logits(model, images), atol=1e-4)


def test_predict_prints_the_curve_against_the_final_exit_alone(exit_run, tmp_path):
    db, _ = exit_run
    out = tmp_path / "ee"
    assert (
        runner.invoke(app, ["export-global", "--db", str(db), "--early-exit", str(out), "--test-images", "0"]).exit_code
        == 0
    )

    result = runner.invoke(
        app, ["predict", "--early-exit", str(out), "--test-images", "100", "--threshold", "0.5", "--threshold", "0.9"]
    )

    assert result.exit_code == 0, result.output
    rows = [row for row in map(str.split, result.output.splitlines()) if len(row) > 2 and row[-2].endswith("%")]
    assert [row[0] for row in rows] == ["final", "0.5", "0.9"]
    assert all(re.fullmatch(r"\d+/\d+/\d+", row[-1]) for row in rows)  # the share leaving at each exit
    assert "% out at 1/2/5" in result.output and "the final exit alone" in result.output


def test_export_global_refuses_early_exits_of_a_model_without_them(tmp_path):
    state = load_model("small_cnn").root.state_dict()
    db = _run_db(tmp_path, "small_cnn", {"classifier.bias": state["classifier.bias"].numpy()})

    result = runner.invoke(app, ["export-global", "--db", str(db), "--early-exit", str(tmp_path / "ee")])

    assert result.exit_code == 1 and "has no early exits" in result.output
    assert not (tmp_path / "ee").exists()


def test_export_global_needs_an_output(exit_run):
    db, _ = exit_run

    result = runner.invoke(app, ["export-global", "--db", str(db)])

    assert result.exit_code == 1 and "give --out FILE" in result.output


def test_predict_refuses_a_folder_that_is_not_an_early_exit_export(tmp_path):
    result = runner.invoke(app, ["predict", "--early-exit", str(tmp_path)])

    assert result.exit_code == 1 and "not an early-exit export" in result.output
