"""The aggregator's state in SQLite (WAL, synchronous=FULL): the only module that touches the
database. Everything a restart needs is here; the server keeps nothing else but rate-limit
buckets.

Every method runs in a transaction; ``with store.transaction():`` groups several into one
(aggregation reads the round's updates and writes the new version, the closed round and the
next round atomically). One connection, one lock: the server is one process and SQLite
serialises writers anyway.

**Schema versions.** ``_SCHEMA`` creates every table a database lacks; ``_MIGRATIONS[v]``
changes the tables a version-``v`` database has into version ``v + 1``'s, in the transaction that
records the new version, so a database of any earlier version opens (one of a later version,
written by a newer fedkit, is refused). Version 2 added the evaluations' total loss and the
``exit_evaluations`` table (an exit model's figures per exit). The probe tables (``probes``,
``probe_answers``: ``toolkit.aggregator.probes``) are new tables only, created by ``_SCHEMA`` in a
database of any version, which an older fedkit ignores: they need no new version.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import InternalError, StoreError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- role: 'enrol' (one-time, device_id set once used), 'device', 'admin'; tokens stored hashed
CREATE TABLE IF NOT EXISTS credentials (
    token_hash TEXT PRIMARY KEY, role TEXT NOT NULL, device_id TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, enrolled REAL NOT NULL, last_seen REAL NOT NULL);
-- outcome: NULL while open, 'aggregated' once closed
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, stage INTEGER NOT NULL, base_version INTEGER NOT NULL,
    opened REAL NOT NULL, deadline REAL, closed REAL, outcome TEXT);
CREATE TABLE IF NOT EXISTS assignments (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, assigned REAL NOT NULL,
    PRIMARY KEY (round, device_id));
-- version: the model version this update was aggregated into (NULL: not yet)
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, idem_key TEXT NOT NULL,
    round INTEGER NOT NULL, base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL,
    accuracy REAL, nbytes INTEGER NOT NULL, sha256 TEXT NOT NULL, blob BLOB NOT NULL,
    received REAL NOT NULL, version INTEGER,
    UNIQUE (device_id, idem_key), UNIQUE (device_id, round));
CREATE INDEX IF NOT EXISTS updates_pending ON updates (version, round);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, round INTEGER, stage INTEGER, created REAL NOT NULL,
    num_updates INTEGER NOT NULL, sha256 TEXT NOT NULL, blob BLOB NOT NULL);
-- weights a device downloaded (200 answers only: a 304 moves no model bytes)
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, version INTEGER NOT NULL, nbytes INTEGER NOT NULL,
    at REAL NOT NULL);
-- loss: an exit model's weighted total loss over its exits (NULL: the evaluator gave accuracy alone)
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY, version INTEGER NOT NULL, source TEXT NOT NULL,
    accuracy REAL NOT NULL, recorded REAL NOT NULL, loss REAL);
-- an exit model's evaluation, per exit position: accuracy and mean cross-entropy
CREATE TABLE IF NOT EXISTS exit_evaluations (
    evaluation INTEGER NOT NULL, position INTEGER NOT NULL, accuracy REAL NOT NULL, loss REAL NOT NULL,
    PRIMARY KEY (evaluation, position));
-- a validation probe: an inference model phones run on their held-out slices (id: the file's
-- sha256); blob NULL once closed (the answers stay, the model bytes are not needed any more)
CREATE TABLE IF NOT EXISTS probes (
    probe TEXT PRIMARY KEY, input TEXT NOT NULL, nbytes INTEGER NOT NULL, blob BLOB,
    created REAL NOT NULL, closed REAL);
-- one answer per device and probe: counts only, no image leaves a phone
CREATE TABLE IF NOT EXISTS probe_answers (
    probe TEXT NOT NULL, device_id TEXT NOT NULL, correct INTEGER NOT NULL, total INTEGER NOT NULL,
    samples INTEGER NOT NULL, received REAL NOT NULL, PRIMARY KEY (probe, device_id));
"""

# version → the statements that make a database of that version the next one's
_MIGRATIONS = {
    1: ("ALTER TABLE evaluations ADD COLUMN loss REAL",),  # exit_evaluations: created by _SCHEMA
}


@dataclass(frozen=True)
class PhoneTraffic:
    device_id: str
    rounds: tuple[int, ...]  # rounds with an accepted update
    bytes_up: int
    bytes_down: int
    downloads: int
    round_seconds: tuple[float, ...]  # assignment to accepted update, per round that has both


def token_hash(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain hash cannot be brute-forced back.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class RoundRow:
    round: int
    stage: int
    base_version: int
    opened: float
    deadline: float | None
    closed: float | None
    outcome: str | None


@dataclass(frozen=True)
class UpdateRow:
    id: int
    device_id: str
    idem_key: str
    round: int
    base_version: int
    num_samples: int
    accuracy: float | None
    nbytes: int
    sha256: str
    version: int | None


@dataclass(frozen=True)
class ExitScore:
    position: int
    accuracy: float
    loss: float  # mean cross-entropy


@dataclass(frozen=True)
class ExitEvaluation:
    """An evaluator's figures for one model version of an exit model."""

    version: int
    round: int | None  # the round that produced it (None: the initial weights)
    accuracy: float  # the final exit's, as the evaluator reported it
    loss: float  # the weighted total loss over the exits
    exits: tuple[ExitScore, ...]  # by position

    @property
    def mean_accuracy(self) -> float:
        """The exit-point model's accuracy: the mean over its exits."""
        return sum(e.accuracy for e in self.exits) / len(self.exits)


@dataclass(frozen=True)
class VersionRow:
    version: int
    round: int | None
    stage: int | None
    created: float
    num_updates: int
    sha256: str


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the aggregator database {self.path} ({exc}); check the --db path") from exc
        self._lock = threading.RLock()
        self._depth = 0
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif version != str(SCHEMA_VERSION):
            self._migrate(version)

    def _migrate(self, found: str) -> None:
        if not (found.isdecimal() and 1 <= int(found) < SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has schema version {found}, this fedkit reads {SCHEMA_VERSION} and earlier: "
                "use a new --db, or the fedkit that wrote it"
            )
        for version in range(int(found), SCHEMA_VERSION):
            with self.transaction():
                if self.get_meta("schema_version") != str(version):
                    continue  # another process opening it migrated it meanwhile
                for statement in _MIGRATIONS[version]:
                    self._q(statement)
                self.set_meta("schema_version", str(version + 1))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit; nested calls join the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write to {self.path} ({exc}); is another server using it?") from exc
            self._depth = 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.transaction():
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(
                    f"database {self.path}: {exc}; the file may be damaged, restore it or use a new --db"
                ) from exc

    # meta
    def get_meta(self, key: str) -> str | None:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._q(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    # credentials and devices
    def add_token(self, token: str, role: str, now: float, device_id: str | None = None) -> None:
        self._q(
            "INSERT INTO credentials(token_hash, role, device_id, created) VALUES(?, ?, ?, ?)",
            (token_hash(token), role, device_id, now),
        )

    def lookup_token(self, token: str) -> tuple[str, str | None] | None:
        """(role, device_id) of a token, or None if unknown."""
        rows = self._q("SELECT role, device_id FROM credentials WHERE token_hash=?", (token_hash(token),))
        return rows[0] if rows else None

    def enrol(self, enrol_token: str, device_id: str, credential: str, now: float) -> str | None:
        """Binds a one-time enrolment token to ``device_id`` and issues ``credential`` (any
        earlier credential of that device is revoked, so a retried enrolment whose answer was
        lost still works). Returns None when the token is unknown or bound to another device,
        and "taken" when the device id belongs to another token."""
        with self.transaction():
            row = self.lookup_token(enrol_token)
            if row is None or row[0] != "enrol" or row[1] not in (None, device_id):
                return None
            if row[1] is None:
                if self._q("SELECT 1 FROM devices WHERE device_id=?", (device_id,)):
                    return "taken"
                self._q("UPDATE credentials SET device_id=? WHERE token_hash=?", (device_id, token_hash(enrol_token)))
                self._q("INSERT INTO devices(device_id, enrolled, last_seen) VALUES(?, ?, ?)", (device_id, now, now))
            self._q("DELETE FROM credentials WHERE role='device' AND device_id=?", (device_id,))
            self.add_token(credential, "device", now, device_id)
            return device_id

    def touch(self, device_id: str, now: float, resolution: float = 5.0) -> None:
        """Records that the device was seen; at most once per ``resolution`` seconds, so a busy
        phone does not cost a disk sync per request."""
        self._q("UPDATE devices SET last_seen=? WHERE device_id=? AND last_seen<=?", (now, device_id, now - resolution))

    def count_devices(self, seen_since: float = float("-inf")) -> int:
        return self._q("SELECT COUNT(*) FROM devices WHERE last_seen>=?", (seen_since,))[0][0]

    # rounds and assignments
    def current_round(self) -> RoundRow | None:
        rows = self._q("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return RoundRow(*rows[0]) if rows else None

    def get_round(self, round_: int) -> RoundRow | None:
        rows = self._q("SELECT * FROM rounds WHERE round=?", (round_,))
        return RoundRow(*rows[0]) if rows else None

    def rounds(self, stage: int | None = None) -> list[RoundRow]:
        if stage is None:
            return [RoundRow(*r) for r in self._q("SELECT * FROM rounds ORDER BY round")]
        return [RoundRow(*r) for r in self._q("SELECT * FROM rounds WHERE stage=? ORDER BY round", (stage,))]

    def open_round(self, round_: int, stage: int, base_version: int, opened: float, deadline: float | None) -> None:
        self._q(
            "INSERT INTO rounds(round, stage, base_version, opened, deadline) VALUES(?, ?, ?, ?, ?)",
            (round_, stage, base_version, opened, deadline),
        )

    def close_round(self, round_: int, outcome: str, closed: float) -> None:
        self._q("UPDATE rounds SET closed=?, outcome=? WHERE round=?", (closed, outcome, round_))

    def assign(self, round_: int, device_id: str, now: float) -> None:
        self._q(
            "INSERT OR IGNORE INTO assignments(round, device_id, assigned) VALUES(?, ?, ?)", (round_, device_id, now)
        )

    def is_assigned(self, round_: int, device_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM assignments WHERE round=? AND device_id=?", (round_, device_id)))

    def count_assigned(self, round_: int) -> int:
        return self._q("SELECT COUNT(*) FROM assignments WHERE round=?", (round_,))[0][0]

    # updates
    def find_update(self, device_id: str, idem_key: str) -> UpdateRow | None:
        rows = self._q(f"SELECT {_UPDATE_COLS} FROM updates WHERE device_id=? AND idem_key=?", (device_id, idem_key))
        return UpdateRow(*rows[0]) if rows else None

    def has_report(self, device_id: str, round_: int) -> bool:
        return bool(self._q("SELECT 1 FROM updates WHERE device_id=? AND round=?", (device_id, round_)))

    def add_update(
        self,
        *,
        device_id: str,
        idem_key: str,
        round_: int,
        base_version: int,
        num_samples: int,
        accuracy: float | None,
        blob: bytes,
        now: float,
        nbytes: int | None = None,
    ) -> int:
        """``nbytes``: what the device sent (default: the blob's length; a SplitFed update's blob
        also holds the edge's tensors)."""
        rows = self._q(
            "INSERT INTO updates(device_id, idem_key, round, base_version, num_samples, accuracy, nbytes, sha256,"
            " blob, received) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                device_id,
                idem_key,
                round_,
                base_version,
                num_samples,
                accuracy,
                len(blob) if nbytes is None else nbytes,
                hashlib.sha256(blob).hexdigest(),
                blob,
                now,
            ),
        )
        return rows[0][0]

    def count_pending(self, round_: int | None = None) -> int:
        """Accepted updates not yet aggregated (of one round, or all: FedBuff's buffer)."""
        if round_ is None:
            return self._q("SELECT COUNT(*) FROM updates WHERE version IS NULL")[0][0]
        return self._q("SELECT COUNT(*) FROM updates WHERE version IS NULL AND round=?", (round_,))[0][0]

    def iter_pending(self, round_: int | None = None) -> Iterator[tuple[UpdateRow, bytes]]:
        """Pending updates one at a time, in device-id order (reproducible sums): memory holds
        one blob, not all of them. Call inside ``transaction()``."""
        sql = f"SELECT {_UPDATE_COLS}, blob FROM updates WHERE version IS NULL"
        args: tuple = ()
        if round_ is not None:
            sql += " AND round=?"
            args = (round_,)
        if not self._depth:  # a generator must not own a transaction: it may be dropped half-read
            raise InternalError("iter_pending must run inside store.transaction()")
        for row in self._conn.execute(sql + " ORDER BY device_id, id", args):
            yield UpdateRow(*row[:-1]), row[-1]

    def mark_pending_aggregated(self, round_: int | None, version: int) -> None:
        """Marks the pending updates (of one round, or all) as aggregated into ``version``."""
        if round_ is None:
            self._q("UPDATE updates SET version=? WHERE version IS NULL", (version,))
        else:
            self._q("UPDATE updates SET version=? WHERE version IS NULL AND round=?", (version, round_))

    def updates(self, version: int | None = None, round_: int | None = None) -> list[UpdateRow]:
        sql = f"SELECT {_UPDATE_COLS} FROM updates WHERE 1=1"
        args: list[int] = []
        if version is not None:
            sql, args = sql + " AND version=?", [*args, version]
        if round_ is not None:
            sql, args = sql + " AND round=?", [*args, round_]
        return [UpdateRow(*r) for r in self._q(sql + " ORDER BY id", tuple(args))]

    def traffic(self) -> tuple[int, int]:
        """(accepted updates, their bytes)."""
        n, b = self._q("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM updates")[0]
        return n, b

    def record_download(self, device_id: str, version: int, nbytes: int, now: float) -> None:
        self._q(
            "INSERT INTO downloads(device_id, version, nbytes, at) VALUES(?, ?, ?, ?)",
            (device_id, version, nbytes, now),
        )

    def phone_traffic(self) -> list[PhoneTraffic]:
        """Per device that pushed or downloaded: its accepted rounds, bytes up (accepted
        updates) and down (weights), and the seconds from each round's assignment to its update."""
        pushed = {
            d: (n, b) for d, n, b in self._q("SELECT device_id, COUNT(*), SUM(nbytes) FROM updates GROUP BY device_id")
        }
        pulled = {
            d: (n, b)
            for d, n, b in self._q("SELECT device_id, COUNT(*), SUM(nbytes) FROM downloads GROUP BY device_id")
        }
        rounds: dict[str, list[int]] = {}
        seconds: dict[str, list[float]] = {}
        for device, round_, took in self._q(
            "SELECT u.device_id, u.round, u.received - a.assigned FROM updates u "
            "LEFT JOIN assignments a ON a.round = u.round AND a.device_id = u.device_id ORDER BY u.round"
        ):
            rounds.setdefault(device, []).append(round_)
            if took is not None:
                seconds.setdefault(device, []).append(took)
        return [
            PhoneTraffic(
                device,
                tuple(rounds.get(device, ())),
                pushed.get(device, (0, 0))[1],
                pulled.get(device, (0, 0))[1],
                pulled.get(device, (0, 0))[0],
                tuple(seconds.get(device, ())),
            )
            for device in sorted(pushed.keys() | pulled.keys())
        ]

    # model versions and evaluations
    def add_version(
        self, version: int, round_: int | None, stage: int | None, blob: bytes, num_updates: int, now: float
    ) -> None:
        self._q(
            "INSERT INTO versions(version, round, stage, created, num_updates, sha256, blob) "
            "VALUES(?, ?, ?, ?, ?, ?, ?)",
            (version, round_, stage, now, num_updates, hashlib.sha256(blob).hexdigest(), blob),
        )

    def latest_version(self) -> VersionRow | None:
        rows = self._q(
            "SELECT version, round, stage, created, num_updates, sha256 FROM versions ORDER BY version DESC LIMIT 1"
        )
        return VersionRow(*rows[0]) if rows else None

    def get_version(self, version: int) -> VersionRow | None:
        rows = self._q(
            "SELECT version, round, stage, created, num_updates, sha256 FROM versions WHERE version=?", (version,)
        )
        return VersionRow(*rows[0]) if rows else None

    def version_of_round(self, round_: int) -> int | None:
        rows = self._q("SELECT version FROM versions WHERE round=?", (round_,))
        return rows[0][0] if rows else None

    def version_blob(self, version: int) -> bytes:
        """The codec bytes of a version that exists (get_version says which do)."""
        rows = self._q("SELECT blob FROM versions WHERE version=?", (version,))
        if not rows:
            raise InternalError(f"model version {version} is not in the store: check get_version first")
        return rows[0][0]

    def add_evaluation(
        self,
        version: int,
        source: str,
        accuracy: float,
        now: float,
        loss: float | None = None,
        exits: tuple[ExitScore, ...] = (),
    ) -> None:
        """``loss`` and ``exits``: an exit model's total loss and figures per exit."""
        with self.transaction():
            rows = self._q(
                "INSERT INTO evaluations(version, source, accuracy, recorded, loss) VALUES(?, ?, ?, ?, ?) RETURNING id",
                (version, source, accuracy, now, loss),
            )
            for e in exits:
                self._q(
                    "INSERT INTO exit_evaluations(evaluation, position, accuracy, loss) VALUES(?, ?, ?, ?)",
                    (rows[0][0], e.position, e.accuracy, e.loss),
                )

    def exit_evaluations(self) -> list[ExitEvaluation]:
        """Per model version, the latest evaluation with figures per exit, by version."""
        latest = self._q(
            "SELECT e.id, e.version, v.round, e.accuracy, e.loss FROM evaluations e "
            "JOIN versions v ON v.version = e.version "
            "WHERE e.id = (SELECT MAX(id) FROM evaluations WHERE version = e.version AND loss IS NOT NULL) "
            "ORDER BY e.version"
        )
        scores: dict[int, list[ExitScore]] = {}
        for evaluation, position, accuracy, loss in self._q(
            "SELECT evaluation, position, accuracy, loss FROM exit_evaluations ORDER BY evaluation, position"
        ):
            scores.setdefault(evaluation, []).append(ExitScore(position, accuracy, loss))
        return [
            ExitEvaluation(version, round_, accuracy, loss, tuple(scores[id_]))
            for id_, version, round_, accuracy, loss in latest
            if id_ in scores
        ]

    def evaluated_versions(self, source: str) -> set[int]:
        """The model versions with an evaluation from ``source``."""
        return {v for (v,) in self._q("SELECT DISTINCT version FROM evaluations WHERE source=?", (source,))}

    def has_evaluations(self) -> bool:
        return bool(self._q("SELECT 1 FROM evaluations LIMIT 1"))

    def evaluation(self, version: int) -> float | None:
        """The latest accuracy recorded for a model version (by an evaluator)."""
        rows = self._q("SELECT accuracy FROM evaluations WHERE version=? ORDER BY id DESC LIMIT 1", (version,))
        return rows[0][0] if rows else None

    def reported_accuracy(self, round_: int) -> float | None:
        """Sample-weighted mean of the accuracies phones reported with their updates of a round."""
        rows = self._q(
            "SELECT SUM(accuracy * num_samples) / SUM(num_samples) FROM updates WHERE round=? AND accuracy IS NOT NULL",
            (round_,),
        )
        return rows[0][0]

    # validation probes
    def add_probe(self, probe: str, input_json: str, blob: bytes, now: float) -> str:
        """Stores a probe, or opens again a closed one with its model bytes: "created",
        "reopened", or "open" (it was open already; nothing changes)."""
        with self.transaction():
            rows = self._q("SELECT closed FROM probes WHERE probe=?", (probe,))
            if not rows:
                self._q(
                    "INSERT INTO probes(probe, input, nbytes, blob, created) VALUES(?, ?, ?, ?, ?)",
                    (probe, input_json, len(blob), blob, now),
                )
                return "created"
            if rows[0][0] is None:
                return "open"
            self._q("UPDATE probes SET closed=NULL, blob=?, input=? WHERE probe=?", (blob, input_json, probe))
            return "reopened"

    def get_probe(self, probe: str) -> ProbeRow | None:
        rows = self._q(f"{_PROBE_SELECT} WHERE p.probe=? GROUP BY p.probe", (probe,))
        return ProbeRow(*rows[0]) if rows else None

    def open_probes(self, device_id: str) -> list[ProbeRow]:
        """The open probes ``device_id`` has not answered, oldest first."""
        rows = self._q(
            f"{_PROBE_SELECT} WHERE p.closed IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM probe_answers WHERE probe=p.probe AND device_id=?) GROUP BY p.probe ORDER BY p.created",
            (device_id,),
        )
        return [ProbeRow(*r) for r in rows]

    def probe_blob(self, probe: str) -> bytes | None:
        """The model bytes of an open probe; None when unknown or closed."""
        rows = self._q("SELECT blob FROM probes WHERE probe=? AND closed IS NULL", (probe,))
        return rows[0][0] if rows else None

    def add_probe_answer(self, probe: str, device_id: str, correct: int, total: int, samples: int, now: float) -> bool:
        """Records a device's answer; False when it had answered already (the first one counts)."""
        rows = self._q(
            "INSERT OR IGNORE INTO probe_answers(probe, device_id, correct, total, samples, received) "
            "VALUES(?, ?, ?, ?, ?, ?) RETURNING 1",
            (probe, device_id, correct, total, samples, now),
        )
        return bool(rows)

    def close_probe(self, probe: str, now: float) -> None:
        self._q("UPDATE probes SET closed=?, blob=NULL WHERE probe=? AND closed IS NULL", (now, probe))


@dataclass(frozen=True)
class ProbeRow:
    probe: str  # the model file's sha256
    input: str  # the input spec, JSON
    nbytes: int
    created: float
    closed: float | None
    answers: int
    correct: int
    total: int


_UPDATE_COLS = "id, device_id, idem_key, round, base_version, num_samples, accuracy, nbytes, sha256, version"
_PROBE_SELECT = (
    "SELECT p.probe, p.input, p.nbytes, p.created, p.closed, COUNT(a.device_id), COALESCE(SUM(a.correct), 0), "
    "COALESCE(SUM(a.total), 0) FROM probes p LEFT JOIN probe_answers a ON a.probe = p.probe"
)
