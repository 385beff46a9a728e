"""fedkit search: bad input fails in one line and writes nothing (as tests/toolkit/test_cli_errors.py
checks for every other command), and a tiny search prints the chosen network and where it went."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.nas.config import parse_nas

runner = CliRunner()
TINY = """name = "cli-tiny"
[data]
train_images = 48
val_images = 16
test_images = 16
adapter_images = 8
[supernet]
warmup_batches = 1
batch_size = 8
batches_per_network = 1
eval_images = 16
[controller]
steps = 2
samples_per_step = 2
[final]
top_k = 2
"""


def _write(name: str, text: str):
    def make(folder: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)

    return make


def _other_search(folder: Path) -> None:  # a search folder of another config
    (folder / "out").mkdir()
    fingerprint = json.loads(parse_nas(tomllib.loads(TINY) | {"seed": 9}).fingerprint())
    (folder / "out" / "config.json").write_text(json.dumps(fingerprint))


FILES = {
    "tiny.toml": _write("tiny.toml", TINY),
    "bad toml": _write("nas.toml", 'name = "x\n'),
    "unknown key": _write("nas.toml", 'name = "x"\n[controller]\nstepz = 3\n'),
    "bad value": _write("nas.toml", 'name = "x"\n[reward]\nbeta = -7\n'),
    "bad families": _write("nas.toml", 'name = "x"\nfamilies = ["mobilenet_v2"]\n'),
    "full out": _write("out/keep.txt", "someone's file\n"),
    "other search": _other_search,
    "data folder": lambda folder: (folder / "data").mkdir(),
}


@dataclass(frozen=True)
class Case:
    args: str
    says: str
    files: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


CASES = {
    "missing config": Case("search --config {tmp}/nope.toml --out {tmp}/out", "nope.toml does not exist"),
    "not TOML": Case("search --config {tmp}/nas.toml --out {tmp}/out", "is not valid TOML", ("bad toml",)),
    "unknown key": Case("search --config {tmp}/nas.toml --out {tmp}/out", "controller.stepz", ("unknown key",)),
    "bad value": Case("search --config {tmp}/nas.toml --out {tmp}/out", "reward.beta", ("bad value",)),
    "one family": Case("search --config {tmp}/nas.toml --out {tmp}/out", "two or more distinct", ("bad families",)),
    "no config option": Case("search --out {tmp}/out", "Missing option '--config'"),
    "out holds other files": Case(
        "search --config {tmp}/tiny.toml --out {tmp}/out", "not a search folder", ("tiny.toml", "full out")
    ),
    "out holds another config's search": Case(
        "search --config {tmp}/tiny.toml --out {tmp}/out", "differing: seed", ("tiny.toml", "other search")
    ),
    "missing dataset": Case(
        "search --config {tmp}/tiny.toml --out {tmp}/out",
        "is missing",
        ("tiny.toml", "data folder"),
        {"FEDKIT_DATA_DIR": "{tmp}/data"},
    ),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_bad_input_fails_in_one_line_and_writes_nothing(case: Case, tmp_path, monkeypatch):
    # Prepare
    for name in case.files:
        FILES[name](tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    env = {k: v.format(tmp=tmp_path) for k, v in case.env.items()}

    # Execute
    result = runner.invoke(app, case.args.format(tmp=tmp_path).split(), env=env)

    # Assert
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.says in lines[0]
    assert isinstance(result.exception, SystemExit), result.exception
    assert _snapshot(tmp_path) == before, "the failed command wrote files"


def test_a_search_prints_the_chosen_network_where_it_is_saved_and_the_report(tmp_path, one_torch_thread):
    FILES["tiny.toml"](tmp_path)

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
