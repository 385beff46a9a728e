"""Watches a simulated run until it is done, through the aggregator's HTTP API with an admin
token (``GET /v1/status``, ``GET /v1/weights/{v}``, ``POST /v1/evaluations``, and SplitFed's
``GET /v1/splitfed/status``), as any operator's tool would: evaluates every new global model
version on the test images, injects the configured faults, and follows the phones' events.
While the aggregator is down (a kill fault), polls simply find nothing new.

An exit model is evaluated at every exit (``Evaluator.exit_metrics``): each version's accuracy
and loss per exit and total loss go to the aggregator (which keeps the best exit-point model)
and into ``metrics.jsonl`` (``exit_accuracy``, ``exit_loss``, ``loss``), its ``accuracy``
staying the final exit's; the last version's test logits are left in ``exit_logits.npz``."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from device_runtime.codec import decode
from toolkit.aggregator.evaluating import evaluation_body
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.status import RunStatus
from toolkit.errors import InternalError, SimulationError
from toolkit.evaluation import Evaluator, ExitMetrics
from toolkit.simulation.config import SimulationConfig
from toolkit.simulation.phones import PhoneProcess
from toolkit.simulation.summary import ExitLogits, Tick

if TYPE_CHECKING:
    from toolkit.models import SplittableModel

POLL_S = 0.25  # a kill fault lands within a quarter second of what it waits for
PHONE_EXIT_GRACE_S = 30.0
ALL_ROUNDS = 100_000


class AdminClient:
    """The aggregator's admin routes; every call answers None while the aggregator is down."""

    def __init__(self, url: str, token: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def _get(self, path: str, **params) -> httpx.Response | None:
        try:
            r = self.http.get(path, params=params)
            r.raise_for_status()
            return r
        except httpx.HTTPError:
            return None  # down or restarting: the next poll asks again

    def status(self) -> RunStatus | None:
        r = self._get("/v1/status", last_rounds=ALL_ROUNDS)
        return None if r is None else RunStatus.model_validate(r.json())

    def weights(self, version: int) -> dict | None:
        r = self._get(f"/v1/weights/{version}")
        return None if r is None else decode(r.content).tensors

    def edge_status(self) -> dict | None:
        r = self._get("/v1/splitfed/status")
        return None if r is None else r.json()

    def post_evaluation(self, body: dict) -> bool:
        """``body``: POST /v1/evaluations' (version, accuracy, and an exit model's exits and loss)."""
        try:
            self.http.post("/v1/evaluations", json={**body, "source": "simulation"}).raise_for_status()
            return True
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.http.close()


class Monitor:
    """Follows the run until it is done: evaluates versions, injects faults, tracks phones."""

    def __init__(
        self,
        config: SimulationConfig,
        run_dir: Path,
        aggregator: AggregatorProcess,
        procs: dict[str, PhoneProcess],
        evaluator: Evaluator,
        admin_token: str,
        on_tick: Callable[[Tick], None],
    ):
        self.config, self.run_dir, self.aggregator = config, run_dir, aggregator
        self.procs, self.evaluator, self.on_tick = procs, evaluator, on_tick
        self.admin = AdminClient(aggregator.url, admin_token)
        self.status: RunStatus | None = None  # the last one the aggregator answered
        self.final_status: RunStatus | None = None  # asked once more at the end
        self.evaluated = 0  # versions evaluated (version 0 first)
        self.pending_evals: list[dict] = []  # evaluation bodies, posted once the aggregator answers
        self.last_exits: tuple[int, ExitMetrics] | None = None  # an exit model's last version, its figures
        self.offsets = {d: 0 for d in procs}
        self.training: dict[str, tuple[int, float]] = {}  # phone → (round, when it started training)
        self.accepted: set[tuple[str, int]] = set()  # (phone, round) the phones were told "accepted"
        self.fault_log: list[dict] = []
        self.todo = list(config.faults)
        self.restarts: list[tuple[float, Callable[[], object], str]] = []
        # open for the whole run: outcome() closes them
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115  (see above)
        self.faults_file = open(run_dir / "faults.jsonl", "a", buffering=1)  # noqa: SIM115  (see above)
        self.t0 = time.time()
        self.accuracy: float | None = None
        self.crashed: dict[str, int] = {}
        self.armed: dict[int, float] = {}
        self.peak_rss: dict[str, float | None] = {}
        self.trained: dict[int, dict[str, dict]] = {}  # round → phone → its "train" event

    def run(self) -> None:
        done_at = None
        while True:
            now = time.time()
            if now - self.t0 > self.config.timeout_s:
                raise SimulationError(
                    f"the run did not finish within timeout_s = {self.config.timeout_s:.0f} s; see {self.run_dir}"
                )
            # Asked before the status: a phone exits once the run is done, so phones all gone
            # with a status read after it and not done means they stopped early. (Asked after,
            # an evaluation slower than the last rounds made a finished run look abandoned.)
            phones_alive = any(p.alive() for p in self.procs.values())
            self.status = self.admin.status() or self.status
            self._read_events()
            self._faults(now)
            self._evaluate()
            self._watch_processes()
            done = self.status is not None and self.status.done
            self.on_tick(self._tick(done))
            if (
                done
                and self.status is not None
                and self.evaluated > self.status.latest_version
                and not self.pending_evals
            ):
                done_at = done_at or now
                if not any(p.alive() for p in self.procs.values()) or now - done_at > PHONE_EXIT_GRACE_S:
                    break
            if not self.aggregator.alive() and not self.restarts:
                raise SimulationError(
                    f"the aggregator exited on its own (code {self.aggregator.returncode}); "
                    f"see {self.run_dir}/aggregator.log"
                )
            if not phones_alive and not self.restarts and not done:
                raise SimulationError(
                    f"every phone has stopped before the run was done; see {self.run_dir}/phones/*/phone.log"
                )
            time.sleep(POLL_S)
        self._read_events()

    def _current(self):
        rounds = self.status.rounds if self.status else []
        return rounds[-1] if rounds else None

    def _tick(self, done: bool) -> Tick:
        rnd = self._current()
        return Tick(
            elapsed_s=time.time() - self.t0,
            stage=None if done or rnd is None else rnd.stage,
            round=rnd.round if rnd else None,
            reports=rnd.reports if rnd else 0,
            assigned=rnd.assigned if rnd else 0,
            accuracy=self.accuracy,
            versions=self.evaluated,
            bytes_up=self.status.bytes_received if self.status else 0,
            phones_running=sum(p.alive() for p in self.procs.values()),
            faults=[f"{f['kind']} {f.get('phone') or ''}".strip() for f in self.fault_log],
            done=done,
        )

    # -- evaluation ------------------------------------------------------------------------
    def _evaluate(self) -> None:
        if self.status is None:
            return
        by_version = {r.version: r for r in self.status.rounds if r.version is not None}
        while self.evaluated <= self.status.latest_version:
            tensors = self.admin.weights(self.evaluated)
            if tensors is None:
                break  # down: evaluated on a later poll
            v = self.evaluated
            body, exit_metrics = evaluation_body(self.evaluator, v, tensors)
            if exit_metrics is not None:
                self.last_exits = (v, exit_metrics)
            accuracy = self.accuracy = body["accuracy"]
            rnd = by_version.get(v)
            self.metrics.write(
                json.dumps(
                    {
                        "version": v,
                        "round": rnd.round if rnd else None,
                        "stage": rnd.stage if rnd else None,
                        "accuracy": accuracy,
                        **exit_fields(body),
                        "updates": rnd.reports if rnd else 0,
                        "samples": rnd.samples if rnd else 0,
                        "elapsed_s": round((rnd.closed if rnd and rnd.closed else time.time()) - self.t0, 2),
                        "round_s": round(rnd.closed - rnd.opened, 2) if rnd and rnd.closed else None,
                        **self._round_costs(rnd.round if rnd else None),
                    }
                )
                + "\n"
            )
            self.pending_evals.append(body)
            self.evaluated += 1
        self.pending_evals = [b for b in self.pending_evals if not self.admin.post_evaluation(b)]

    def _round_costs(self, round_: int | None) -> dict:
        """Each phone's own compute in the round (its "train" event) and, SplitFed, the bytes of
        activations up and gradients down and the edge's compute."""
        trained = self.trained.get(round_, {}) if round_ is not None else {}
        costs: dict = {"phone_compute_s": {d: e.get("compute_s") for d, e in sorted(trained.items())}}
        if self.config.mode != "federated" and round_ is not None:
            costs["activation_bytes"] = sum(e.get("activation_bytes", 0) for e in trained.values())
            costs["gradient_bytes"] = sum(e.get("gradient_bytes", 0) for e in trained.values())
            costs["exchange_s"] = {d: e.get("exchange_s") for d, e in sorted(trained.items())}
            status = self.admin.edge_status()
            costs["edge_s"] = status["edge_seconds"].get(str(round_)) if status else None
        return costs

    # -- phones ----------------------------------------------------------------------------
    def _read_events(self) -> None:
        for device, proc in self.procs.items():
            events, self.offsets[device] = _events(proc.phone_dir / "events.jsonl", self.offsets[device])
            for e in events:
                if e["event"] == "round":
                    self.training[device] = (e["round"], e["t"])
                elif e["event"] == "train":
                    self.trained.setdefault(e["round"], {})[device] = e
                elif e["event"] == "done":
                    self.peak_rss[device] = e.get("peak_rss_mb")
                elif e["event"] == "upload" and e.get("status") == "accepted":
                    self.accepted.add((device, e["round"]))
                    self.training.pop(device, None)

    def _watch_processes(self) -> None:
        for device, proc in self.procs.items():
            code = proc.returncode
            if code not in (None, 0, -signal.SIGKILL) and device not in self.crashed:
                self.crashed[device] = code
                self._log_fault(
                    {"kind": "phone_exit", "phone": device, "detail": f"exited with code {code}; see its phone.log"}
                )

    # -- faults ----------------------------------------------------------------------------
    def _faults(self, now: float) -> None:
        for when, action, what in list(self.restarts):
            if now >= when:
                self.restarts.remove((when, action, what))
                action()
                self._log_fault({"kind": "restart", "detail": what})
        for f in list(self.todo):
            if f.kind == "kill_phone" and f.phone is not None:  # the config requires its phone
                started = self.training.get(f.phone)
                if started and started[0] >= f.round and now >= started[1] + f.after_s and self.procs[f.phone].alive():
                    self.todo.remove(f)
                    self.procs[f.phone].kill()
                    self._log_fault(
                        {
                            "kind": "kill_phone",
                            "phone": f.phone,
                            "round": started[0],
                            "detail": f"SIGKILL {now - started[1]:.1f} s into training round {started[0]}",
                        }
                    )
                    self.restarts.append((now + f.down_s, self.procs[f.phone].start, f"{f.phone} restarted"))
            elif f.kind == "kill_aggregator":
                rnd, status = self._current(), self.status  # rnd is status's newest round
                if status and rnd and rnd.round >= f.round and rnd.open and rnd.reports and self.aggregator.alive():
                    seen = self.armed.setdefault(id(f), now)  # when the round's first update was seen
                    if now >= seen + f.after_s:
                        self.todo.remove(f)
                        accepted = status.updates_accepted
                        self.aggregator.kill()
                        self.status = None  # what it said before the kill may be stale now
                        self._log_fault(
                            {
                                "kind": "kill_aggregator",
                                "round": rnd.round,
                                "detail": f"SIGKILL mid-round with {accepted} updates accepted "
                                f"({rnd.reports} in round {rnd.round})",
                                "accepted_before": accepted,
                            }
                        )
                        self.restarts.append(
                            (now + f.down_s, self.aggregator.start, "aggregator restarted on the same database")
                        )

    def _log_fault(self, entry: dict) -> None:
        entry = {"t": round(time.time(), 3), "elapsed_s": round(time.time() - self.t0, 2), **entry}
        self.fault_log.append(entry)
        self.faults_file.write(json.dumps(entry) + "\n")

    def outcome(self) -> dict:
        """The run's outcome, asked of the aggregator once more at the end (it is still up)."""
        status = self.admin.status() or self.status
        in_db = {(p.device_id, r) for p in status.phones for r in p.rounds} if status else set()
        lost = sorted(self.accepted - in_db)
        self.metrics.close()
        self.faults_file.close()
        if self.last_exits is not None:
            exit_logits(self.evaluator.model, *self.last_exits).save(self.run_dir)
        self.final_status = status
        out = {
            "rounds": max((r.round for r in status.rounds if r.version is not None), default=0) if status else 0,
            "final_accuracy": self.accuracy,
            "updates_accepted": status.updates_accepted if status else 0,
            "bytes_accepted": status.bytes_received if status else 0,
            "accepted_told_phones": len(self.accepted),
            "accepted_lost": len(lost),
            "faults": self.fault_log,
            "crashed_phones": self.crashed,
            "splitfed": self.admin.edge_status() if self.config.mode != "federated" else None,
            "best_exit": status.best if status else None,
        }
        self.admin.close()
        return out


def exit_logits(model: SplittableModel, version: int, m: ExitMetrics) -> ExitLogits:
    """``exit_logits.npz``'s content: ``m``'s test logits with what inference to each exit costs."""
    from toolkit.models import ExitModel

    if not isinstance(model, ExitModel) or m.logits is None or m.labels is None:
        raise InternalError("exit logits are kept for an exit model's evaluations with logits only")
    stats = model.exit_stats()
    return ExitLogits(
        version=version,
        positions=np.array([e.position for e in stats], dtype=np.int64),
        flops=np.array([e.flops for e in stats], dtype=np.int64),
        alone_flops=sum(s.flops for s in model.stats),
        logits=m.logits,
        labels=m.labels,
    )


def exit_fields(body: dict) -> dict:
    """An exit model's evaluation as metrics.jsonl has it (nothing for another model)."""
    if "exits" not in body:
        return {}
    return {
        "exit_accuracy": {p: e["accuracy"] for p, e in body["exits"].items()},
        "exit_loss": {p: e["loss"] for p, e in body["exits"].items()},
        "loss": body["loss"],
    }


def _events(path: Path, offset: int) -> tuple[list[dict], int]:
    """New complete JSON lines of an events file from ``offset``."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end
