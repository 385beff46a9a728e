"""What the monitor posts and records for each evaluated version: the evaluation body the
aggregator's route accepts, metrics.jsonl's exit fields, and exit_logits.npz (the whole
monitor runs in the simulation's end-to-end tests)."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.aggregator.evaluating import evaluation_body
from toolkit.aggregator.routes import EvaluationRequest
from toolkit.evaluation import Evaluator
from toolkit.models import load_model
from toolkit.simulation.monitor import exit_fields, exit_logits
from toolkit.simulation.summary import ExitLogits


@pytest.fixture(scope="module")
def exit_model():
    return load_model("small_cnn+exits:1,2")


def test_an_exit_models_body_is_what_the_route_accepts(exit_model, fashion_test):
    evaluator = Evaluator(exit_model, 3, 100, exit_weights=(1.0, 0.5, 2.0))
    tensors = {k: v.numpy() for k, v in exit_model.root.state_dict().items()}

    body, metrics = evaluation_body(evaluator, 4, tensors)

    request = EvaluationRequest.model_validate({**body, "source": "simulation"})  # as FastAPI validates it
    assert metrics is not None and request.version == 4
    assert request.accuracy == metrics.accuracy[5] == evaluator.accuracy(tensors)
    assert [(s.position, s.accuracy, s.loss) for s in request.exit_scores()] == [
        (p, metrics.accuracy[p], metrics.loss[p]) for p in (1, 2, 5)
    ]
    assert request.loss == pytest.approx(metrics.loss[1] + 0.5 * metrics.loss[2] + 2.0 * metrics.loss[5])
    fields = exit_fields(body)
    assert fields["exit_accuracy"] == {str(p): metrics.accuracy[p] for p in (1, 2, 5)}
    assert fields["exit_loss"]["2"] == metrics.loss[2] and fields["loss"] == request.loss


def test_a_plain_models_body_is_its_accuracy_alone(fashion_test):
    model = load_model("small_cnn")
    evaluator = Evaluator(model, 4, 50)
    tensors = {k: v.numpy() for k, v in model.root.state_dict().items() if k.startswith("classifier")}
    body, metrics = evaluation_body(evaluator, 0, tensors)
    assert body == {"version": 0, "accuracy": evaluator.accuracy(tensors)} and metrics is None
    assert exit_fields(body) == {}
    EvaluationRequest.model_validate(body)


def test_exit_logits_hold_the_final_models_logits_and_each_exits_cost(exit_model, fashion_test, tmp_path):
    evaluator = Evaluator(exit_model, 0, 60)
    _, metrics = evaluation_body(evaluator, 7, {})
    assert metrics is not None

    exit_logits(exit_model, 7, metrics).save(tmp_path)
    saved = ExitLogits.load(tmp_path)

    assert saved is not None and saved.version == 7
    np.testing.assert_array_equal(saved.positions, [1, 2, 5])
    stats = exit_model.exit_stats()
    np.testing.assert_array_equal(saved.flops, [s.flops for s in stats])
    assert saved.alone_flops == sum(s.flops for s in exit_model.stats) < saved.flops[-1]  # no branch run
    np.testing.assert_array_equal(saved.logits, metrics.logits)
    np.testing.assert_array_equal(saved.labels, fashion_test.labels[:60])
    assert ExitLogits.load(tmp_path / "elsewhere") is None


def test_a_run_whose_phones_finish_during_a_slow_evaluation_ends_as_done(tmp_path):
    # Prepare: the aggregator says "not done" until the one phone has finished and exited; the
    # phone finishes while the monitor evaluates version 0 (slowly), so by the next poll every
    # phone is gone and the status is done. Stand-ins for the aggregator process, the phone
    # process and the evaluator: this is the monitor's loop alone.
    from types import SimpleNamespace

    from toolkit.aggregator.status import RunStatus
    from toolkit.simulation import parse_simulation
    from toolkit.simulation.monitor import Monitor

    config = parse_simulation(
        {"name": "race", "phones": [{"class": "mid-2022"}], "stages": [{"name": "s", "rounds": 1, "lr": 0.01}]}
    )
    phone_dir = tmp_path / "phone-1"
    phone_dir.mkdir()
    phone = SimpleNamespace(finished=False, phone_dir=phone_dir, returncode=None)
    phone.alive = lambda: not phone.finished

    def status(done: bool) -> RunStatus:
        return RunStatus(
            name="race", mode="fedavg", done=done, stage=None, stage_index=None, stages=1, round=None,
            latest_version=0, accuracy=None, devices=1, updates_accepted=0, bytes_received=0, rounds=[], phones=[],
        )  # fmt: skip

    class Admin:
        def status(self):
            return status(done=phone.finished)

        def weights(self, version):
            return {}

        def post_evaluation(self, body):
            return True

    class SlowEvaluator:
        exits = ()

        def accuracy(self, tensors):
            phone.finished = True  # the phone's last round ends while this evaluation runs
            return 0.5

    aggregator = SimpleNamespace(url="http://127.0.0.1:9", alive=lambda: True)
    monitor = Monitor(config, tmp_path, aggregator, {"phone-1": phone}, SlowEvaluator(), "token", lambda tick: None)
    monitor.admin = Admin()

    # Execute: before the fix this raised "every phone has stopped before the run was done"
    monitor.run()

    # Assert
    assert monitor.status is not None and monitor.status.done and monitor.evaluated == 1
