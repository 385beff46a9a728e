"""The aggregator's own evaluator: with an ``[evaluation]`` section (``test_images`` > 0),
``fedkit serve`` evaluates every model version on the first N Fashion-MNIST test images (the
validation set the server holds) and records it as an evaluator posting POST /v1/evaluations
would, from source "aggregator": an exit model at every exit, so the run's best exit-point model
(``toolkit.aggregator.best``) is in its status however the fleet was started.

It runs in a thread of its own, never in a request. Every ``POLL_S`` it looks for versions
without an evaluation from source "aggregator" and evaluates them oldest first: version 0 at
start, each new version after its round, and whatever a stopped server missed once it is
started again. Each evaluation is one "evaluation" log line (the coordinator's).

Starting it imports torch, loads the run's model and computes the frozen part's test features
(cached on disk, ``toolkit.central.features``), in the thread. The frozen part ends where the
run's version 0 starts (``toolkit.evaluation.frozen_end``): blocks before it are never trained,
so they are the zoo's. An exit model's λ is ``exit_weights`` (default 1 each, the plans'
default; ``fedkit run-config --evaluate`` writes the plan's). A failure
(Fashion-MNIST missing, a model or exit weights that do not fit the run) is logged once, as
"evaluation_failed" saying what to do, and ends evaluating: the server serves on, and once it is
fixed a restart evaluates every version missed.
"""

from __future__ import annotations

import logging
import threading

from device_runtime.codec import decode
from toolkit.aggregator.config import EvaluationConfig
from toolkit.aggregator.coordinator import Coordinator, log_event
from toolkit.aggregator.routes import EvaluationRequest
from toolkit.errors import ConfigError, FedkitError, InternalError, PlanError
from toolkit.evaluation import Evaluator, ExitMetrics, frozen_end

SOURCE = "aggregator"
POLL_S = 1.0  # how often the store is asked for new versions
STOP_TIMEOUT_S = 60.0  # an evaluation under way is finished before the thread ends

log = logging.getLogger("fedkit.aggregator")


def evaluation_body(evaluator: Evaluator, version: int, tensors: dict) -> tuple[dict, ExitMetrics | None]:
    """POST /v1/evaluations' body for a version: its accuracy and, for an exit model, every
    exit's accuracy and loss and the total loss; and the exit model's figures, logits included."""
    if not evaluator.exits:
        return {"version": version, "accuracy": evaluator.accuracy(tensors)}, None
    m = evaluator.exit_metrics(tensors, logits=True)
    body = {
        "version": version,
        "accuracy": m.accuracy[evaluator.exits[-1]],
        "exits": {str(p): {"accuracy": m.accuracy[p], "loss": m.loss[p]} for p in evaluator.exits},
        "loss": m.total_loss,
    }
    return body, m


def record(coordinator: Coordinator, body: dict, source: str) -> bool:
    """Records ``body`` (``evaluation_body``'s) as POST /v1/evaluations does, validated by the
    route's own model; False if there is no such version."""
    req = EvaluationRequest.model_validate({**body, "source": source})
    return coordinator.record_evaluation(req.version, req.accuracy, req.source, req.loss, req.exit_scores())


class AggregatorEvaluator:
    """Evaluates the run's versions in a background thread: ``start()``, then ``stop()``."""

    def __init__(self, coordinator: Coordinator, config: EvaluationConfig, model_id: str, poll_s: float = POLL_S):
        self.coordinator, self.config, self.model_id, self.poll_s = coordinator, config, model_id, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedkit-evaluator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        """Started and neither stopped nor failed."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Asks the thread to end and waits for it (for an evaluation under way to finish)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            evaluator = self._evaluator()
            store = self.coordinator.store
            done = store.evaluated_versions(SOURCE)
            while not self._stop.is_set():
                latest = store.latest_version()
                if latest is None:  # version 0 is stored before the server starts (Coordinator.start)
                    raise InternalError("the store holds no model version")
                for version in range(latest.version + 1):
                    if self._stop.is_set():
                        return
                    if version not in done:
                        body, _ = evaluation_body(evaluator, version, decode(store.version_blob(version)).tensors)
                        record(self.coordinator, body, SOURCE)
                        done.add(version)
                self._stop.wait(self.poll_s)
        except FedkitError as exc:
            self._failed(str(exc))
        except Exception as exc:  # the thread's boundary: whatever went wrong, the server serves on
            self._failed(f"{type(exc).__name__}: {exc} (unexpected: please report it with the server's log)")

    def _evaluator(self) -> Evaluator:
        from toolkit.models import load_model  # torch: only an aggregator that evaluates loads it
        from toolkit.planning.planner import weights_by_exit

        model = load_model(self.model_id)
        initial = decode(self.coordinator.store.version_blob(0)).tensors
        stop = frozen_end(model, initial)
        weights = None
        if self.config.exit_weights is not None:
            if not model.exits:
                raise ConfigError(
                    f"{model.model_id} has no exits: remove [evaluation] exit_weights from the run config"
                )
            try:
                weights = list(weights_by_exit(model, self.config.exit_weights).values())
            except PlanError as exc:
                raise ConfigError(f"[evaluation] exit_weights: {exc} (fix it in the run config)") from exc
        evaluator = Evaluator(model, stop, self.config.test_images, weights)
        log_event(
            "evaluator_started",
            model=model.model_id,
            test_images=len(evaluator.labels),
            stop_block=stop,
            exit_weights=list(evaluator.exit_weights) or None,
        )
        return evaluator

    def _failed(self, reason: str) -> None:
        log.error(
            "evaluation_failed",
            extra={
                "fields": {
                    "reason": reason,
                    "next": "the server serves on without evaluating; fix the cause and restart fedkit serve, "
                    "which evaluates every version missed",
                }
            },
        )


def open_evaluator(coordinator: Coordinator, poll_s: float = POLL_S) -> AggregatorEvaluator | None:
    """The run's own evaluator (its ``[evaluation]`` section), not started; None when it is off."""
    config = coordinator.config
    if not config.evaluation.on:
        return None
    if config.model is None:  # RunConfig requires a model for evaluation
        raise InternalError("a run config that evaluates without a model")
    return AggregatorEvaluator(coordinator, config.evaluation, config.model, poll_s)
