from __future__ import annotations

import json

from typer.testing import CliRunner

from toolkit import __version__
from toolkit.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fedkit {__version__}"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "train-central" in result.stdout


def test_train_central_prints_the_epochs_and_writes_the_result(tmp_path):
    out = tmp_path / "central.json"
    args = ["train-central", "--epochs", "1", "--model", "small_cnn", "--max-train", "500", "--max-test", "200"]

    result = runner.invoke(app, [*args, "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.stdout and "final accuracy" in result.stdout
    record = json.loads(out.read_text())
    assert record["config"]["model"] == "small_cnn" and record["config"]["epochs"] == 1
    assert len(record["figures"]["test_accuracy"]) == 1


def test_missing_dataset_exits_1_with_one_line_on_stderr(tmp_path):
    out = tmp_path / "central.json"

    result = runner.invoke(
        app, ["train-central", "--epochs", "1", "--out", str(out)], env={"FEDKIT_DATA_DIR": str(tmp_path)}
    )

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "train-images-idx3-ubyte.gz is missing" in lines[0]
    assert "apt-get install -y dataset-fashion-mnist" in lines[0]
    assert result.stdout == ""
    assert not out.exists()


def test_bad_option_exits_1_with_one_line_on_stderr(tmp_path):
    result = runner.invoke(app, ["train-central", "--epochs", "0", "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: epochs must be at least 1, got 0"
