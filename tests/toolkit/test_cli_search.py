"""fedkit search on a tiny config prints the chosen network and where it went (its bad input is in
tests/toolkit/test_cli_errors.py, with every other command's)."""

from __future__ import annotations

import json

from nas_helpers import TINY_NAS
from typer.testing import CliRunner

from toolkit.cli import app

runner = CliRunner()


def test_a_search_prints_the_chosen_network_where_it_is_saved_and_the_report(tmp_path, one_torch_thread):
    (tmp_path / "tiny.toml").write_text(TINY_NAS)

    result = runner.invoke(app, ["search", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert f"chosen network: {summary['chosen']['arch_id']}" in result.stdout
    assert "saved as nas:cli-tiny" in result.stdout and "--model nas:cli-tiny" in result.stdout
    assert f"report: {tmp_path / 'out' / 'report' / 'index.html'}" in result.stdout
    assert (tmp_path / "out" / "report" / "index.html").is_file()
    # run again: the finished search is continued, not refused, and chooses the same network
    again = runner.invoke(app, ["search", "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "out")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out" / "search.json").read_text())["chosen"] == summary["chosen"]
