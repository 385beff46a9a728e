"""A run's status, read from the aggregator's database (``fedkit status``, GET /v1/status)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pydantic import BaseModel

from toolkit.aggregator.best import best_exit_model
from toolkit.aggregator.store import Store
from toolkit.errors import StoreError


class RoundStatus(BaseModel):
    round: int
    stage: str
    base_version: int
    open: bool
    assigned: int
    reports: int
    version: int | None  # the version it produced
    accuracy: float | None  # the evaluator's for that version, else the phones' reported mean
    samples: int  # of its accepted updates
    opened: float  # unix time
    closed: float | None


class PhoneStatus(BaseModel):
    """One device, measured at the aggregator: what it moved and how long its rounds took."""

    device_id: str
    rounds: list[int]  # rounds with an accepted update
    bytes_up: int  # accepted updates
    bytes_down: int  # weights downloaded
    downloads: int
    round_s: float | None  # median seconds from a round's assignment to the device's update


class ExitStatus(BaseModel):
    position: int
    accuracy: float
    loss: float  # mean cross-entropy


class BestExitModel(BaseModel):
    """An exit-model run's best version so far (``toolkit.aggregator.best``'s rule)."""

    version: int
    round: int | None
    mean_accuracy: float  # over the exits: the exit-point model's accuracy
    loss: float  # the weighted total over the exits
    exits: list[ExitStatus]
    evaluated: int  # versions evaluated per exit, it among them


class RunStatus(BaseModel):
    schema_version: int = 1
    name: str
    mode: str
    done: bool
    stage: str | None
    stage_index: int | None
    stages: int
    round: int | None
    latest_version: int
    accuracy: float | None
    devices: int
    updates_accepted: int
    bytes_received: int
    rounds: list[RoundStatus]
    phones: list[PhoneStatus]
    best: BestExitModel | None = None  # exit models, once an evaluator posted figures per exit


def run_status(store: Store, last_rounds: int = 10) -> RunStatus:
    raw = store.get_meta("config")
    if raw is None:
        raise StoreError(f"{store.path} holds no run: start it with fedkit serve first")
    config = json.loads(raw)
    stages = [s["name"] for s in config["stages"]]
    rounds = []
    for rnd in store.rounds()[-last_rounds:]:
        version = store.version_of_round(rnd.round)
        accuracy = store.evaluation(version) if version is not None else None
        reports = store.updates(round_=rnd.round)
        rounds.append(
            RoundStatus(
                round=rnd.round,
                stage=stages[rnd.stage] if rnd.stage < len(stages) else str(rnd.stage),
                base_version=rnd.base_version,
                open=rnd.closed is None,
                assigned=store.count_assigned(rnd.round),
                reports=len(reports),
                version=version,
                accuracy=accuracy if accuracy is not None else store.reported_accuracy(rnd.round),
                samples=sum(u.num_samples for u in reports),
                opened=rnd.opened,
                closed=rnd.closed,
            )
        )
    current = rounds[-1] if rounds else None
    latest, newest = store.latest_version(), store.current_round()
    accepted, nbytes = store.traffic()
    accuracy = next((r.accuracy for r in reversed(rounds) if r.accuracy is not None), None)
    evaluated = store.exit_evaluations()
    best = best_exit_model(evaluated)
    return RunStatus(
        name=config["name"],
        mode=config["mode"],
        done=store.get_meta("done") == "1",
        stage=current.stage if current else None,
        stage_index=newest.stage if current and newest else None,
        stages=len(stages),
        round=current.round if current else None,
        latest_version=latest.version if latest else 0,
        accuracy=accuracy,
        devices=store.count_devices(),
        updates_accepted=accepted,
        bytes_received=nbytes,
        rounds=rounds,
        phones=[
            PhoneStatus(
                device_id=t.device_id,
                rounds=list(t.rounds),
                bytes_up=t.bytes_up,
                bytes_down=t.bytes_down,
                downloads=t.downloads,
                round_s=statistics.median(t.round_seconds) if t.round_seconds else None,
            )
            for t in store.phone_traffic()
        ],
        best=None
        if best is None
        else BestExitModel(
            version=best.version,
            round=best.round,
            mean_accuracy=best.mean_accuracy,
            loss=best.loss,
            exits=[ExitStatus(position=e.position, accuracy=e.accuracy, loss=e.loss) for e in best.exits],
            evaluated=len(evaluated),
        ),
    )


def read_status(db: str | Path) -> RunStatus:
    """The status of the run in database ``db`` (safe while the server runs: WAL readers)."""
    if not Path(db).is_file():
        raise StoreError(f"no aggregator database at {db}; pass the --db that fedkit serve uses")
    store = Store(db)
    try:
        return run_status(store)
    finally:
        store.close()


class PhoneVsPlan(BaseModel):
    """A device's measured round beside its plan's prediction (per round: seconds, bytes)."""

    device_id: str
    rounds: int
    measured_s: float | None
    predicted_s: float | None
    measured_up: float | None  # bytes of its accepted updates, per round
    predicted_up: float | None
    measured_down: float | None  # bytes of weights it downloaded, per round
    predicted_down: float | None


def against_plan(status: RunStatus, predicted: dict[str, dict[str, float]]) -> list[PhoneVsPlan]:
    """Every device of ``status`` beside ``predicted`` (device → its plan's ``predicted``, e.g.
    from a fleet plan whose phone names are the device ids). SplitFed activations and
    gradients are not in the measured bytes: they travel to the edge, not through updates."""
    rows = []
    for phone in status.phones:
        n = len(phone.rounds)
        guess = predicted.get(phone.device_id, {})
        rows.append(
            PhoneVsPlan(
                device_id=phone.device_id,
                rounds=n,
                measured_s=phone.round_s,
                predicted_s=guess.get("total"),
                measured_up=phone.bytes_up / n if n else None,
                predicted_up=guess.get("up_bytes"),
                measured_down=phone.bytes_down / n if n else None,
                predicted_down=guess.get("down_bytes"),
            )
        )
    return rows
