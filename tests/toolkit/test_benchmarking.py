"""The one benchmark record: every committed result follows it, every benchmark writes it with
the one writer, and the commit it names is the code that ran."""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest

from toolkit.benchmarking import REPO, RESULTS, SCHEMA_VERSION, BenchmarkRecord, commit, write_result

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
# The record's own keys: a script that puts one in a dict literal is building the record itself.
RECORD_KEYS = {"benchmark", "results", "schema_version", "commit", "dirty", "machine", "config", "figures"}


def test_every_benchmark_has_a_results_file():
    assert {p.stem for p in RESULTS.glob("*.json")} == {p.stem for p in SCRIPTS}


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_every_results_file_is_a_current_record(path):
    record = BenchmarkRecord.read(path)

    assert record.name == path.stem
    assert record.schema_version == SCHEMA_VERSION
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", record.commit)
    assert path.read_text() == record.to_json() + "\n"  # one line, nothing the record drops


def test_the_writer_writes_what_it_prints(tmp_path, capsys):
    figures = {"seconds": 0.1 + 0.2, "by_phones": {"10": [1.5e-07, True, None]}}

    record = write_result("demo", config={"phones": 10}, figures=figures, folder=tmp_path)

    printed = capsys.readouterr().out
    assert printed.count("\n") == 1
    assert (tmp_path / "demo.json").read_text() == printed
    assert list(json.loads(printed)) == ["name", "schema_version", "commit", "dirty", "machine", "config", "figures"]
    assert json.loads(printed)["figures"] == figures  # unrounded, unchanged
    assert BenchmarkRecord.read(tmp_path / "demo.json") == record
    assert record.name == "demo" and record.schema_version == SCHEMA_VERSION and record.machine.cores


def record_problems(source: str, name: str) -> list[str]:
    """What keeps a benchmark script from reporting through the one writer."""
    tree = ast.parse(source)
    problems = []
    if not any(
        isinstance(node, ast.ImportFrom)
        and node.module == "toolkit.benchmarking"
        and "write_result" in {alias.name for alias in node.names}
        for node in ast.walk(tree)
    ):
        problems.append("does not import write_result from toolkit.benchmarking")
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "write_result"
    ]
    if [getattr(call.args[0], "value", None) if call.args else None for call in calls] != [name]:
        problems.append(f'does not call write_result("{name}", ...) once')
    keys = {
        key.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant)
    }
    if keys & RECORD_KEYS:
        problems.append(f"builds the record itself: {sorted(keys & RECORD_KEYS)}")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_benchmark_reports_through_the_one_writer(script):
    assert record_problems(script.read_text(), script.stem) == []


def test_a_hand_built_record_is_caught():
    old = """
from toolkit.benchmarking import machine, write_result
write_result({"benchmark": "codec", "results": {}, "config": {"machine": machine()}}, RESULT)
"""
    assert record_problems(old, "codec") == [
        'does not call write_result("codec", ...) once',
        "builds the record itself: ['benchmark', 'config', 'machine', 'results']",
    ]


def git(repo, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_commit_is_head_and_marks_a_dirty_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # wherever tmp is, no checkout above it
    assert commit(tmp_path) == ("unknown", False)
    git(tmp_path, "init", "-q")
    assert commit(tmp_path) == ("unknown", False)  # no commit yet
    (tmp_path / "bench.py").write_text("print(1)\n")
    git(tmp_path, "add", "bench.py")
    git(tmp_path, "commit", "-q", "-m", "bench")
    head = git(tmp_path, "rev-parse", "HEAD")

    (tmp_path / "notes.txt").write_text("untracked: not part of the code that ran\n")
    assert commit(tmp_path) == (head, False)
    (tmp_path / "bench.py").write_text("print(2)\n")
    assert commit(tmp_path) == (head, True)
