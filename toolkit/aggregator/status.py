"""A run's status, read from the aggregator's database (``fedkit status``, GET /v1/status)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

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
        rounds.append(
            RoundStatus(
                round=rnd.round,
                stage=stages[rnd.stage] if rnd.stage < len(stages) else str(rnd.stage),
                base_version=rnd.base_version,
                open=rnd.closed is None,
                assigned=store.count_assigned(rnd.round),
                reports=len(store.updates(round_=rnd.round)),
                version=version,
                accuracy=accuracy if accuracy is not None else store.reported_accuracy(rnd.round),
            )
        )
    current = rounds[-1] if rounds else None
    latest = store.latest_version()
    accepted, nbytes = store.traffic()
    accuracy = next((r.accuracy for r in reversed(rounds) if r.accuracy is not None), None)
    return RunStatus(
        name=config["name"],
        mode=config["mode"],
        done=store.get_meta("done") == "1",
        stage=current.stage if current else None,
        stage_index=store.current_round().stage if current else None,
        stages=len(stages),
        round=current.round if current else None,
        latest_version=latest.version if latest else 0,
        accuracy=accuracy,
        devices=store.count_devices(),
        updates_accepted=accepted,
        bytes_received=nbytes,
        rounds=rounds,
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
