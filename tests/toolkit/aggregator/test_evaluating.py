"""The aggregator's own evaluator: `fedkit serve` with an ``[evaluation]`` section evaluates every
model version at every exit (the real server in a subprocess, phones pushing over HTTP), a
restarted server evaluates the versions it missed, off records nothing, and what goes wrong
(a bad section, missing data, exit weights that do not fit) is said clearly. The server of the
restart and failure tests is the same app served in this process (tests/serving.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from aggregator_helpers import enrol, payload
from serving import serving
from typer.testing import CliRunner

from device_runtime.codec import decode
from toolkit.aggregator.app import create_app
from toolkit.aggregator.best import best_exit_model
from toolkit.aggregator.config import EvaluationConfig, load_config, parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.evaluating import SOURCE, open_evaluator
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.server import main as server_main
from toolkit.aggregator.server import open_coordinator
from toolkit.aggregator.status import RunStatus
from toolkit.aggregator.store import Store
from toolkit.cli import app
from toolkit.errors import ConfigError
from toolkit.evaluation import Evaluator, frozen_end
from toolkit.models import load_model
from toolkit.planning import Pin, PlanConfig, Planner
from toolkit.profiling import DeviceProfile, links
from toolkit.runs import config_toml
from toolkit.splitfed import initial_weights

MODEL = "small_cnn+exits:1,2"  # exits 1, 2 and the final one, 5
T = 4  # the run trains the classifier and every branch: version 0 starts at block 4
IMAGES = 200
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process evaluators' (see the fixture)


@pytest.fixture(scope="module")
def exit_model():
    return load_model(MODEL)


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict]]]:
    """The aggregator's log events of this process: (event, fields)."""
    seen: list[tuple[str, dict]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), getattr(record, "fields", {})))

    logger, handler = logging.getLogger("fedkit.aggregator"), Collect()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(level)


def write_run(folder: Path, model, evaluation: dict | None) -> Path:
    """run.toml and weights.bin of an exit run (version 0 as `fedkit run-config` writes it)."""
    (folder / "weights.bin").write_bytes(initial_weights(model, T))
    data = {
        "name": "evaluated",
        "model": model.model_id,
        "weights": "weights.bin",
        "run_dir": ".",
        "fedavg": {"min_reports": 1},
        "stages": [{"name": "all", "rounds": 5, "lr": 0.1}],
    }
    if evaluation is not None:
        data["evaluation"] = evaluation
    (folder / "run.toml").write_text(config_toml(parse_config(data)))
    return folder / "run.toml"


def step(names: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A phone's delta: small random moves of every tensor, so every version scores differently."""
    rng = np.random.default_rng(seed)
    return {name: (0.05 * rng.standard_normal(t.shape)).astype(np.float32) for name, t in names.items()}


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.05)
    return found


def push_rounds(co: Coordinator, rounds: range) -> None:
    """One phone ("a", enrolled) trains ``rounds``, each closing a round and making a version."""
    tensors = decode(co.store.version_blob(0)).tensors
    for round_ in rounds:
        task = co.task_for("a")
        assert task["round"] == round_, task
        body = payload("a", round_, task["base_version"], step(tensors, round_))
        assert co.push("a", f"k{round_}", body, None).status == "accepted"


def server_events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_serve_evaluates_every_version_at_every_exit_and_keeps_the_best(tmp_path, exit_model, monkeypatch):
    # Prepare: the real server, evaluating on 200 test images with exit 1 weighing half; torch
    # on one thread in it, as one_torch_thread does here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    toml = write_run(tmp_path, exit_model, {"test_images": IMAGES, "exit_weights": {1: 0.5}})
    db, log = tmp_path / "aggregator.sqlite", tmp_path / "server.log"
    server = AggregatorProcess(toml, db, log)
    (enrol_token,) = server.issue_tokens(1)
    (admin_token,) = server.issue_tokens(1, "admin")
    server.start()
    try:
        # Execute: a phone trains two rounds over HTTP (versions 1 and 2)
        http = httpx.Client(base_url=server.url, timeout=10)
        r = http.post("/v1/enrol", json={"device_id": "a"}, headers={"Authorization": f"Bearer {enrol_token}"})
        phone = {"Authorization": f"Bearer {r.raise_for_status().json()['token']}"}
        tensors = decode((tmp_path / "weights.bin").read_bytes()).tensors
        for round_ in (1, 2):
            task = http.get("/v1/task", headers=phone).raise_for_status().json()
            body = payload("a", round_, task["base_version"], step(tensors, round_))
            answer = http.post("/v1/updates", content=body, headers={**phone, "Idempotency-Key": f"k{round_}"})
            assert answer.json()["status"] == "accepted", answer.text

        def evaluated() -> RunStatus | None:
            got = http.get("/v1/status", headers={"Authorization": f"Bearer {admin_token}"}).raise_for_status()
            status = RunStatus.model_validate(got.json())
            return status if status.best is not None and status.best.evaluated == 3 else None

        status = wait_until(evaluated, "the server evaluates versions 0, 1 and 2")
        http.close()
    finally:
        server.stop()

    # Assert: every version's figures per exit, from source "aggregator", are what the
    # evaluator finds for that version with the run's λ; the status keeps the best of them
    store = Store(db)
    try:
        assert store.evaluated_versions(SOURCE) == {0, 1, 2}
        figures = store.exit_evaluations()
        evaluator = Evaluator(exit_model, T, IMAGES, (0.5, 1.0, 1.0))
        for e in figures:
            m = evaluator.exit_metrics(decode(store.version_blob(e.version)).tensors)
            assert [x.position for x in e.exits] == [1, 2, 5]
            assert [x.accuracy for x in e.exits] == pytest.approx([m.accuracy[p] for p in (1, 2, 5)], abs=1e-9)
            assert [x.loss for x in e.exits] == pytest.approx([m.loss[p] for p in (1, 2, 5)], rel=1e-5)
            assert e.loss == pytest.approx(m.total_loss, rel=1e-5) and e.accuracy == e.exits[-1].accuracy
        best = best_exit_model(figures)
    finally:
        store.close()
    assert [e.version for e in figures] == [0, 1, 2] and len({e.loss for e in figures}) == 3
    assert best is not None and status.best is not None and status.best.version == best.version
    assert [r.accuracy for r in status.rounds if r.version is not None] == [e.accuracy for e in figures[1:]]
    logged = server_events(log)
    (started,) = [e for e in logged if e["event"] == "evaluator_started"]
    assert started["stop_block"] == T == frozen_end(exit_model, tensors) and started["exit_weights"] == [0.5, 1, 1]
    evaluations = [e for e in logged if e["event"] == "evaluation"]
    assert [(e["version"], e["source"]) for e in evaluations] == [(0, SOURCE), (1, SOURCE), (2, SOURCE)]
    assert set(evaluations[0]["exits"]) == {"1", "2", "5"}


def test_serve_without_evaluation_records_none(tmp_path, exit_model):
    toml = write_run(tmp_path, exit_model, None)
    db, log = tmp_path / "aggregator.sqlite", tmp_path / "server.log"
    server = AggregatorProcess(toml, db, log)
    server.start()
    try:
        (token,) = server.issue_tokens(1)
        http = httpx.Client(base_url=server.url, timeout=10)
        r = http.post("/v1/enrol", json={"device_id": "a"}, headers={"Authorization": f"Bearer {token}"})
        phone = {"Authorization": f"Bearer {r.raise_for_status().json()['token']}"}
        task = http.get("/v1/task", headers=phone).raise_for_status().json()
        tensors = decode((tmp_path / "weights.bin").read_bytes()).tensors
        body = payload("a", 1, task["base_version"], step(tensors, 1))
        assert http.post("/v1/updates", content=body, headers={**phone, "Idempotency-Key": "k"}).json()["status"] == (
            "accepted"
        )
        http.close()
        time.sleep(1.5)  # longer than an evaluator's poll: it would have evaluated version 0 by now
    finally:
        server.stop()
    store = Store(db)
    try:
        assert store.latest_version() is not None and store.latest_version().version == 1
        assert not store.has_evaluations()
    finally:
        store.close()
    logged = server_events(log)
    assert [e["evaluation"] for e in logged if e["event"] == "serve"] == [0]
    assert not [e for e in logged if e["event"] in ("evaluator_started", "evaluation", "evaluation_failed")]
    assert load_config(toml).evaluation == EvaluationConfig()  # absent: off


def test_a_restarted_server_evaluates_the_versions_it_missed(tmp_path, exit_model, events):
    # Prepare: a server that evaluated version 0, then stopped
    toml = write_run(tmp_path, exit_model, {"test_images": IMAGES})
    co = open_coordinator(toml)
    evaluator = open_evaluator(co, poll_s=0.05)
    assert evaluator is not None
    with serving(create_app(co, evaluator=evaluator)):
        wait_until(lambda: co.store.evaluated_versions(SOURCE) == {0}, "version 0 evaluated")
    assert not evaluator.running  # the server's shutdown stopped it
    # versions 1 and 2 made while no evaluator runs
    enrol(co, "a")
    push_rounds(co, range(1, 3))
    assert co.store.evaluated_versions(SOURCE) == {0}
    co.store.close()

    # Execute: started again on the same database
    co = open_coordinator(toml)
    evaluator = open_evaluator(co, poll_s=0.05)
    assert evaluator is not None
    with serving(create_app(co, evaluator=evaluator)):
        wait_until(lambda: co.store.evaluated_versions(SOURCE) == {0, 1, 2}, "versions 1 and 2 evaluated")
        push_rounds(co, range(3, 4))  # and a new one while it serves
        wait_until(lambda: 3 in co.store.evaluated_versions(SOURCE), "version 3 evaluated")
    co.store.close()

    # Assert: each version evaluated once, per exit
    versions = [f["version"] for event, f in events if event == "evaluation" and f["source"] == SOURCE]
    assert versions == [0, 1, 2, 3]
    assert [event for event, _ in events].count("evaluator_started") == 2
    assert not [f for event, f in events if event == "evaluation_failed"]


@pytest.mark.parametrize(
    "evaluation, data_missing, reason",
    [
        ({"test_images": IMAGES}, True, "is missing"),
        ({"test_images": IMAGES, "exit_weights": {3: 1.0}}, False, "which are no exits"),
        ({"test_images": IMAGES, "exit_weights": [0, 0, 0]}, False, "exit_weights are all 0"),
    ],
)
def test_a_failure_to_evaluate_is_logged_once_and_the_server_serves_on(
    tmp_path, exit_model, events, monkeypatch, evaluation, data_missing, reason
):
    if data_missing:
        monkeypatch.setenv("FEDKIT_DATA_DIR", str(tmp_path / "no-data"))
    co = open_coordinator(write_run(tmp_path, exit_model, evaluation))
    evaluator = open_evaluator(co, poll_s=0.05)
    assert evaluator is not None
    with serving(create_app(co, evaluator=evaluator)) as url:
        wait_until(lambda: not evaluator.running, "the evaluator gives up")
        assert httpx.get(f"{url}/v1/health").status_code == 200
        enrol(co, "a")
        push_rounds(co, range(1, 2))  # the run goes on
    co.store.close()
    (failed,) = [f for event, f in events if event == "evaluation_failed"]
    assert reason in failed["reason"] and "restart fedkit serve" in failed["next"]
    assert not [f for event, f in events if event == "evaluation"]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"test_images": -1}, "evaluation.test_images:"),
        ({"test_images": 10001}, "evaluation.test_images:"),
        ({"test_images": "all"}, "evaluation.test_images:"),
        ({"test_images": 10, "images": 5}, "evaluation.images:"),
        ({"test_images": 10, "exit_weights": [1, -1]}, "give finite weights of 0 or more"),
        ({"test_images": 10, "exit_weights": {"x": 1}}, "evaluation.exit_weights"),
    ],
)
def test_a_bad_evaluation_section_is_a_config_error_naming_it(section, message):
    data = {"name": "x", "weights": "w.bin", "model": MODEL, "stages": [{"name": "a", "rounds": 1, "lr": 0.1}]}
    with pytest.raises(ConfigError, match="fix these fields") as err:
        parse_config({**data, "evaluation": section})
    assert message in str(err.value)


def test_evaluation_needs_the_runs_model_and_serve_says_so(tmp_path, capsys):
    data = {"name": "x", "weights": "w.bin", "stages": [{"name": "a", "rounds": 1, "lr": 0.1}]}
    with pytest.raises(ConfigError, match="name the run's 'model'"):
        parse_config({**data, "evaluation": {"test_images": 10}})
    assert not parse_config({**data, "evaluation": {"test_images": 0}}).evaluation.on  # 0: off, no model needed
    (tmp_path / "run.toml").write_text(
        'name = "x"\nweights = "w.bin"\n[evaluation]\ntest_images = 10\n[[stages]]\nname = "a"\nrounds = 1\nlr = 0.1\n'
    )
    assert server_main(["--config", str(tmp_path / "run.toml"), "--port", "0"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: run config ") and "name the run's 'model'" in line


def test_run_config_evaluate_writes_the_section_with_the_plans_exit_weights(tmp_path, exit_model):
    edge = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000)
    phone = DeviceProfile(
        name="a", source="catalog", cpu_cores=8, gflops=20.0, memory_mb=900.0, engines=("ort",), link=links()["4g"]
    )
    config = PlanConfig(budget_s=1e6, exit_weights={1: 0.5})
    Planner(exit_model, edge, config).plan([phone], {"a": Pin(cut=2)}).save(tmp_path / "plan.json")

    for out, extra in (("on", ["--evaluate", "200"]), ("off", [])):
        result = runner.invoke(
            app, ["run-config", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / out), *extra]
        )
        assert result.exit_code == 0, result.output

    on = load_config(tmp_path / "on" / "run.toml").evaluation
    assert on == EvaluationConfig(test_images=200, exit_weights={1: 0.5})
    assert not load_config(tmp_path / "off" / "run.toml").evaluation.on
    result = runner.invoke(app, ["run-config", "--plan", str(tmp_path / "plan.json"), "--out", "x", "--evaluate", "-1"])
    assert result.exit_code != 0
