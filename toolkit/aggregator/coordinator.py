"""The round state machine: enrolment, tasks, pushes, closing rounds, aggregating, stages.

Everything it decides is read from and written to the Store, so a restarted server continues
exactly where the killed one stopped. The HTTP layer (app.py) maps its outcomes to status
codes; the math is in aggregation.py, the stage logic in schedule.py.

Synchronous FedAvg: a round hands tasks to up to ``over_selection`` × the reports it wants
(``participation`` × phones seen recently) and closes as soon as it has them, or at its
deadline if it has ``min_reports``; until it has that many it stays open past the deadline
and any available phone may take it (accepted updates are never dropped). Pushes for a closed
round are stale. FedBuff: every phone that asks gets the current version; a push is accepted
while its base is at most ``max_staleness`` versions old, and every ``buffer_size`` accepted
updates make a new version (one "round").
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_runtime.codec import Update, UpdateHeader, decode, encode
from device_runtime.errors import CodecError
from toolkit.aggregator import schedule
from toolkit.aggregator.aggregation import Contribution, aggregate, l2_norm
from toolkit.aggregator.best import best_exit_model
from toolkit.aggregator.config import RunConfig, config_json
from toolkit.aggregator.store import ExitScore, RoundRow, Store, VersionRow
from toolkit.errors import ConfigError, InternalError, StoreError

log = logging.getLogger("fedkit.aggregator")

DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
AGGREGATOR_ID = "aggregator"


def log_event(event: str, **fields: Any) -> None:
    log.info(event, extra={"fields": fields})


@dataclass(frozen=True)
class PushOutcome:
    """A definite answer to a push. ``status``: accepted, duplicate, stale, rejected, or (SplitFed)
    restart: the edge lost its part of the round, train it again from batch 0; the HTTP layer
    turns ``code`` into the status code."""

    status: str
    code: int
    reason: str = ""
    round: int | None = None
    update_id: int | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "reason": self.reason}
        if self.round is not None:
            out["round"] = self.round
        if self.update_id is not None:
            out["update_id"] = self.update_id
        return out


@dataclass(frozen=True)
class Enrolment:
    status: str  # "enrolled", "invalid_token" (unknown, or bound to another device), "id_taken"
    credential: str = ""


def _rejected(code: int, reason: str) -> PushOutcome:
    return PushOutcome("rejected", code, reason)


@dataclass
class Coordinator:
    config: RunConfig
    store: Store
    clock: Callable[[], float] = time.time
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # SplitFed (set by toolkit.splitfed.edge): given a device, a round and its update's tensor
    # names, the edge's copy of the blocks past the device's cut as a delta from the round's
    # base (merged into the update when it is accepted, so each block is averaged over every
    # copy that trained it), None (nothing to merge), or a reason the update cannot be merged:
    # the edge lost the copy, and the push is answered "restart" (train the round again).
    edge_delta: Callable[[str, int, set[str]], dict[str, np.ndarray] | str | None] | None = None

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """Loads the initial weights (version 0) into a new database, or checks they match the
        database's, then opens the first round if none is open."""
        path = self.config.weights_path()
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"initial weights {path} cannot be read ({exc}); export the bundle or fix 'weights'"
            ) from exc
        try:
            initial = decode(blob)
        except CodecError as exc:
            raise ConfigError(f"initial weights {path} are not a codec weights file: {exc}") from exc
        if initial.header.kind != "weights":
            raise ConfigError(f"initial weights {path} hold a {initial.header.kind!r} payload, not 'weights'")
        self.shapes = {name: tuple(t.shape) for name, t in initial.tensors.items()}
        with self.store.transaction():
            first = self.store.get_version(0)
            if first is None:
                self.store.add_version(0, None, None, blob, 0, self.clock())
            elif self.store.version_blob(0) != blob:
                raise StoreError(
                    f"{self.store.path} was started from other initial weights than {path}: "
                    "use a new --db for a new run, or the original weights to continue this one"
                )
            self.store.set_meta("config", config_json(self.config))
            if self.store.current_round() is None:
                self._open_round(1, 0)
        self.tick()

    # -- credentials ------------------------------------------------------------------------
    def authenticate(self, token: str) -> tuple[str, str | None] | None:
        """(role, device_id) for a device or admin credential; None otherwise."""
        found = self.store.lookup_token(token)
        if found is None or found[0] not in ("device", "admin"):
            return None
        role, device_id = found
        if role == "device" and device_id is not None:  # a device credential always names its device
            self.store.touch(device_id, self.clock())
        return found

    def enrol(self, enrol_token: str, device_id: str) -> Enrolment:
        credential = secrets.token_urlsafe(32)
        result = self.store.enrol(enrol_token, device_id, credential, self.clock())
        if result is None:
            return Enrolment("invalid_token")
        if result == "taken":
            return Enrolment("id_taken")
        log_event("enrol", device=device_id)
        return Enrolment("enrolled", credential)

    # -- tasks ------------------------------------------------------------------------------
    def task_for(self, device_id: str) -> dict[str, Any]:
        """A task, or ``{"status": "wait", "retry_after": s}``, or ``{"status": "done"}``."""
        with self.store.transaction():
            rnd = self.store.current_round()
            if rnd is None or rnd.closed is not None:
                return {"status": "done"}
            if self.store.has_report(device_id, rnd.round):
                return self._wait(rnd)
            if not self.store.is_assigned(rnd.round, device_id):
                if self.config.mode == "fedavg" and not self._may_assign(rnd):
                    return self._wait(rnd)
                self.store.assign(rnd.round, device_id, self.clock())
                log_event("assign", device=device_id, round=rnd.round, version=rnd.base_version)
            return self._task(rnd, device_id)

    def _may_assign(self, rnd: RoundRow) -> bool:
        stage = self.config.stages[rnd.stage]
        _, quota = schedule.round_sizes(stage.participation, self._available(), self.config.fedavg.over_selection)
        past_deadline = rnd.deadline is not None and self.clock() >= rnd.deadline
        return past_deadline or self.store.count_assigned(rnd.round) < quota

    def _task(self, rnd: RoundRow, device_id: str) -> dict[str, Any]:
        stage = self.config.stages[rnd.stage]
        return {
            "status": "task",
            "round": rnd.round,
            "base_version": rnd.base_version,
            "lr": stage.lr,
            "local_epochs": stage.local_epochs,
            "batch_size": stage.batch_size,
            "encoding": stage.encoding,
            "seed": schedule.device_seed(self.config.seed, rnd.round, device_id),
            "momentum": stage.momentum,
            "stage": stage.name,
            "stage_index": rnd.stage,
            "trainable_blocks": stage.trainable_blocks,
            "deadline": rnd.deadline,
        }

    def _wait(self, rnd: RoundRow) -> dict[str, Any]:
        retry = 1.0
        if rnd.deadline is not None:
            retry = min(10.0, max(1.0, rnd.deadline - self.clock()))
        return {"status": "wait", "round": rnd.round, "retry_after": retry}

    def _available(self) -> int:
        return self.store.count_devices(self.clock() - self.config.limits.seen_window_s)

    # -- weights ----------------------------------------------------------------------------
    def weights(self, version: int) -> tuple[bytes, str] | None:
        row = self.store.get_version(version)
        return None if row is None else (self.store.version_blob(version), row.sha256)

    # -- pushes -----------------------------------------------------------------------------
    def push(self, device_id: str, idem_key: str | None, body: bytes, accuracy: float | None) -> PushOutcome:
        """Checks and stores one update; an "accepted" outcome is committed when this returns."""
        with self.store.transaction():  # one transaction: checks and insert see one state
            outcome = self._push(device_id, idem_key, body, accuracy)
        log_event(
            "push", device=device_id, status=outcome.status, reason=outcome.reason, round=outcome.round, bytes=len(body)
        )
        if outcome.status == "accepted":
            self.tick()
        return outcome

    def _push(self, device_id: str, idem_key: str | None, body: bytes, accuracy: float | None) -> PushOutcome:
        if idem_key is None or not IDEMPOTENCY_KEY.match(idem_key):
            return _rejected(400, "missing or malformed Idempotency-Key header (1-128 of A-Z a-z 0-9 _ . : -)")
        if accuracy is not None and not (math.isfinite(accuracy) and 0 <= accuracy <= 1):
            return _rejected(422, "reported accuracy must be a number in [0, 1]")
        known = self.store.find_update(device_id, idem_key)
        if known is not None:
            return PushOutcome("duplicate", 200, "already accepted under this idempotency key", known.round, known.id)
        try:
            update = decode(body, max_bytes=self.config.limits.max_update_bytes)
        except CodecError as exc:
            return _rejected(422, f"payload does not decode: {exc}")
        h = update.header
        if h.device_id != device_id:
            return _rejected(403, f"update is signed for device {h.device_id!r}, but this credential is {device_id!r}")
        if h.kind != "delta":
            return _rejected(422, f"update kind is {h.kind!r}; the aggregator takes 'delta' updates")
        problem = self._check_tensors(update)
        if problem:
            return _rejected(422, problem)
        with self.store.transaction():
            rnd = self.store.get_round(h.round)
            if rnd is None or not self.store.is_assigned(h.round, device_id):
                return _rejected(403, f"round {h.round} was not given to this device; pull a task first")
            if h.base_version != rnd.base_version:
                return _rejected(
                    422, f"round {h.round} trains from version {rnd.base_version}, the update says {h.base_version}"
                )
            if self.store.has_report(device_id, h.round):
                return PushOutcome(
                    "duplicate", 200, f"this device already has an accepted update for round {h.round}", h.round
                )
            stale = self._staleness_problem(rnd)
            if stale:
                return PushOutcome("stale", 409, stale, h.round)
            blob = body
            edge = self.edge_delta(device_id, h.round, set(update.tensors)) if self.edge_delta is not None else None
            if isinstance(edge, str):
                return PushOutcome("restart", 409, edge, h.round)
            if edge:  # stored as one update: the device's tensors (as decoded) and the edge's, fp32
                blob = encode(h, {**edge, **update.tensors}, "fp32")
            update_id = self.store.add_update(
                device_id=device_id,
                idem_key=idem_key,
                round_=h.round,
                base_version=h.base_version,
                num_samples=h.num_samples,
                accuracy=accuracy,
                blob=blob,
                now=self.clock(),
                nbytes=len(body),
            )
        return PushOutcome("accepted", 200, "", h.round, update_id)

    def _check_tensors(self, update: Update) -> str:
        if not 1 <= update.header.num_samples <= 1_000_000_000:
            return f"num_samples is {update.header.num_samples}; it must be between 1 and 10^9"
        if not update.tensors:
            return "update holds no tensors"
        for name, t in update.tensors.items():
            if name not in self.shapes:
                return f"tensor {name!r} is not a trainable tensor of this run's model"
            if tuple(t.shape) != self.shapes[name]:
                return f"tensor {name!r} has shape {tuple(t.shape)}, the model's is {self.shapes[name]}"
            if t.dtype != np.float32:
                return f"tensor {name!r} decodes to {t.dtype}, not float32"
            if not np.isfinite(t).all():
                return f"tensor {name!r} holds NaN or infinite values"
        norm, limit = l2_norm(update.tensors), self.config.limits.max_update_norm
        if norm > limit:
            return f"update L2 norm {norm:.4g} exceeds the limit {limit:g}"
        return ""

    def _staleness_problem(self, rnd: RoundRow) -> str:
        if self.config.mode == "fedavg":
            return "" if rnd.closed is None else f"round {rnd.round} closed before this update arrived"
        latest = self._latest().version
        current = self.store.current_round()
        if current is None or current.closed is not None:
            return "the run has finished"
        staleness = latest - rnd.base_version
        if staleness > self.config.fedbuff.max_staleness:
            most = self.config.fedbuff.max_staleness
            return f"trained from version {rnd.base_version}, {staleness} versions old (max {most})"
        return ""

    # -- evaluations ------------------------------------------------------------------------
    def record_evaluation(
        self,
        version: int,
        accuracy: float,
        source: str = "evaluator",
        loss: float | None = None,
        exits: tuple[ExitScore, ...] = (),
    ) -> bool:
        """Records an evaluator's accuracy for a model version (an exit model's: its final exit's)
        and, for an exit model, its total loss and figures per exit; False if there is no such
        version. The best exit-point model (``toolkit.aggregator.best``) is chosen again from the
        stored evaluations, so it is logged when this one becomes it."""
        if self.store.get_version(version) is None:
            return False
        with self.store.transaction():
            self.store.add_evaluation(version, source, accuracy, self.clock(), loss, exits)
            best = best_exit_model(self.store.exit_evaluations()) if exits else None
        log_event(
            "evaluation",
            version=version,
            accuracy=accuracy,
            source=source,
            loss=loss,
            exits={e.position: e.accuracy for e in exits} or None,
        )
        if best is not None and best.version == version:
            log_event("best_exit_model", version=version, mean_accuracy=best.mean_accuracy, loss=best.loss)
        return True

    # -- closing rounds ---------------------------------------------------------------------
    def tick(self) -> None:
        """Closes the open round if it is complete (called after every accepted push, and once
        a second by the server for deadlines and for phones that left)."""
        with self.store.transaction():
            rnd = self.store.current_round()
            if rnd is None or rnd.closed is not None:
                return
            if self.config.mode == "fedbuff":
                if self.store.count_pending() >= self.config.fedbuff.buffer_size:
                    self._close(rnd, pending_round=None)
                return
            reports = self.store.count_pending(rnd.round)
            stage = self.config.stages[rnd.stage]
            target, _ = schedule.round_sizes(stage.participation, self._available(), self.config.fedavg.over_selection)
            enough = max(target, self.config.fedavg.min_reports)
            past_deadline = rnd.deadline is not None and self.clock() >= rnd.deadline
            if reports >= enough or (past_deadline and reports >= self.config.fedavg.min_reports):
                self._close(rnd, pending_round=rnd.round)

    def _close(self, rnd: RoundRow, pending_round: int | None) -> None:
        latest = self._latest()
        base = decode(self.store.version_blob(latest.version)).tensors
        counts = {"updates": 0, "samples": 0}

        def contributions():
            counts["updates"] = counts["samples"] = 0
            for row, blob in self.store.iter_pending(pending_round):
                counts["updates"] += 1
                counts["samples"] += row.num_samples
                yield Contribution(decode(blob).tensors, row.num_samples, latest.version - row.base_version)

        robust = self.config.robust
        delta = aggregate(
            contributions,
            method=robust.aggregator,
            trim_fraction=robust.trim_fraction,
            clip=robust.clip_norm,
            staleness_kind=self.config.fedbuff.staleness_weight,
        )
        new = {name: (t + delta[name]).astype(np.float32) if name in delta else t for name, t in base.items()}
        version = latest.version + 1
        header = UpdateHeader(AGGREGATOR_ID, rnd.round, latest.version, max(1, counts["samples"]), kind="weights")
        now = self.clock()
        self.store.add_version(version, rnd.round, rnd.stage, encode(header, new, "fp32"), counts["updates"], now)
        self.store.mark_pending_aggregated(pending_round, version)
        self.store.close_round(rnd.round, "aggregated", now)
        log_event(
            "round_closed", round=rnd.round, version=version, updates=counts["updates"], samples=counts["samples"]
        )
        nxt = schedule.next_stage(self.config.stages, rnd.stage, self._stage_accuracies(rnd.stage))
        if nxt is None:
            self.store.set_meta("done", "1")
            log_event("run_done", round=rnd.round, version=version)
            return
        if nxt != rnd.stage:
            log_event("stage", stage=self.config.stages[nxt].name, stage_index=nxt, round=rnd.round + 1)
        self._open_round(rnd.round + 1, nxt)

    def _open_round(self, round_: int, stage: int) -> None:
        now = self.clock()
        deadline = now + self.config.fedavg.deadline_s if self.config.mode == "fedavg" else None
        base = self._latest().version
        self.store.open_round(round_, stage, base, now, deadline)
        log_event("round_opened", round=round_, stage=self.config.stages[stage].name, version=base, deadline=deadline)

    def _latest(self) -> VersionRow:
        latest = self.store.latest_version()
        if latest is None:  # version 0 is stored before anything else runs (_load_initial)
            raise InternalError("the store holds no model version")
        return latest

    def _stage_accuracies(self, stage: int) -> list[float | None]:
        # One source for the whole run, so phones' and the evaluator's numbers never mix: the
        # evaluator's once it has recorded anything, else what the phones reported.
        evaluated = self.store.has_evaluations()
        out = []
        for rnd in self.store.rounds(stage):
            if rnd.outcome != "aggregated":
                continue
            if evaluated:
                version = self.store.version_of_round(rnd.round)
                out.append(self.store.evaluation(version) if version is not None else None)
            else:
                out.append(self.store.reported_accuracy(rnd.round))
        return out


def json_log_line(record: logging.LogRecord) -> str:
    """One JSON object per event: time, event name, and the event's fields."""
    line = {"ts": round(record.created, 3), "event": record.getMessage(), **getattr(record, "fields", {})}
    return json.dumps(line, default=str)
