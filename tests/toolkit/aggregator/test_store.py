import sqlite3

import pytest

from toolkit.aggregator.store import ExitScore, Store, token_hash
from toolkit.errors import InternalError, StoreError


def test_the_database_is_wal_and_survives_a_reopen(tmp_path):
    store = Store(tmp_path / "a" / "db.sqlite")
    store.set_meta("k", "v")
    store.add_version(0, None, None, b"blob", 0, 1.0)
    store.close()
    again = Store(tmp_path / "a" / "db.sqlite")
    assert again.get_meta("k") == "v" and again.version_blob(0) == b"blob"
    assert again._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_tokens_are_stored_hashed(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_token("secret-token", "enrol", 1.0)
    raw = sqlite3.connect(tmp_path / "db.sqlite").execute("SELECT token_hash FROM credentials").fetchall()
    assert raw == [(token_hash("secret-token"),)] and "secret-token" not in raw[0][0]


def test_enrolment_is_one_time_per_device_and_retry_safe(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_token("t1", "enrol", 1.0)
    store.add_token("t2", "enrol", 1.0)
    assert store.enrol("t1", "phone-a", "cred-1", 2.0) == "phone-a"
    # the answer was lost: the same token and id give a new credential and revoke the old one
    assert store.enrol("t1", "phone-a", "cred-2", 3.0) == "phone-a"
    assert store.lookup_token("cred-1") is None
    assert store.lookup_token("cred-2") == ("device", "phone-a")
    assert store.enrol("t1", "phone-b", "cred-3", 3.0) is None  # token bound to phone-a
    assert store.enrol("t2", "phone-a", "cred-4", 3.0) == "taken"
    assert store.enrol("nope", "phone-c", "cred-5", 3.0) is None
    assert store.enrol("cred-2", "phone-c", "cred-6", 3.0) is None  # a credential is no enrolment token


def test_a_failed_transaction_leaves_nothing(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    with pytest.raises(RuntimeError), store.transaction():
        store.set_meta("k", "v")
        raise RuntimeError("boom")
    assert store.get_meta("k") is None


def test_a_database_of_another_schema_is_refused(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.set_meta("schema_version", "99")
    store.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "db.sqlite")


def test_an_unopenable_path_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "file" / "db.sqlite")


def test_pending_updates_are_read_inside_a_transaction_only(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for device in ("b", "a"):
        store.add_update(
            device_id=device,
            idem_key="k",
            round_=1,
            base_version=0,
            num_samples=5,
            accuracy=None,
            blob=device.encode(),
            now=1.0,
        )
    with pytest.raises(InternalError):
        next(store.iter_pending(1))
    with store.transaction():
        assert [(row.device_id, blob) for row, blob in store.iter_pending(1)] == [("a", b"a"), ("b", b"b")]
        store.mark_pending_aggregated(1, 1)
    assert store.count_pending() == 0 and {u.version for u in store.updates()} == {1}


# The database layout fedkit wrote before exit models (schema version 1), as it shipped.
SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE credentials (token_hash TEXT PRIMARY KEY, role TEXT NOT NULL, device_id TEXT, created REAL NOT NULL);
CREATE TABLE devices (device_id TEXT PRIMARY KEY, enrolled REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, stage INTEGER NOT NULL, base_version INTEGER NOT NULL,
    opened REAL NOT NULL, deadline REAL, closed REAL, outcome TEXT);
CREATE TABLE assignments (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, assigned REAL NOT NULL, PRIMARY KEY (round, device_id));
CREATE TABLE updates (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, idem_key TEXT NOT NULL,
    round INTEGER NOT NULL, base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL,
    accuracy REAL, nbytes INTEGER NOT NULL, sha256 TEXT NOT NULL, blob BLOB NOT NULL,
    received REAL NOT NULL, version INTEGER,
    UNIQUE (device_id, idem_key), UNIQUE (device_id, round));
CREATE INDEX updates_pending ON updates (version, round);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY, round INTEGER, stage INTEGER, created REAL NOT NULL,
    num_updates INTEGER NOT NULL, sha256 TEXT NOT NULL, blob BLOB NOT NULL);
CREATE TABLE downloads (
    id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, version INTEGER NOT NULL, nbytes INTEGER NOT NULL,
    at REAL NOT NULL);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY, version INTEGER NOT NULL, source TEXT NOT NULL,
    accuracy REAL NOT NULL, recorded REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO versions VALUES (0, NULL, NULL, 1.0, 0, 'sha', x'00');
INSERT INTO versions VALUES (1, 1, 0, 2.0, 3, 'sha', x'01');
INSERT INTO evaluations VALUES (1, 1, 'simulation', 0.625, 3.0);
"""


def test_a_schema_1_database_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(SCHEMA_V1)
    old.close()

    store = Store(path)

    assert store.get_meta("schema_version") == "2"
    assert store.evaluation(1) == 0.625 and store.exit_evaluations() == []  # accuracy alone: no exit figures
    store.add_evaluation(1, "simulation", 0.75, 4.0, loss=2.5, exits=(ExitScore(2, 0.5, 1.0), ExitScore(5, 0.75, 1.5)))
    assert store.evaluation(1) == 0.75
    (evaluation,) = store.exit_evaluations()
    assert (evaluation.version, evaluation.round, evaluation.loss, evaluation.mean_accuracy) == (1, 1, 2.5, 0.625)
    store.close()
    again = Store(path)  # a migrated database opens as any other
    assert again.get_meta("schema_version") == "2" and len(again.exit_evaluations()) == 1


@pytest.mark.parametrize("version", ["0", "3", "one"])
def test_a_database_of_no_version_this_fedkit_migrates_is_refused(tmp_path, version):
    store = Store(tmp_path / "db.sqlite")
    store.set_meta("schema_version", version)
    store.close()
    with pytest.raises(StoreError, match=f"schema version {version}, this fedkit reads 2 and earlier"):
        Store(tmp_path / "db.sqlite")


def test_exit_evaluations_are_the_latest_per_version_with_figures_per_exit(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for version in (0, 1, 2):
        store.add_version(version, version or None, 0, b"x", 1, 1.0)
    store.add_evaluation(0, "e", 0.1, 1.0, loss=9.0, exits=(ExitScore(3, 0.1, 4.5), ExitScore(5, 0.1, 4.5)))
    store.add_evaluation(1, "e", 0.5, 2.0, loss=3.0, exits=(ExitScore(5, 0.5, 1.0), ExitScore(3, 0.3, 2.0)))
    store.add_evaluation(1, "e", 0.6, 3.0, loss=2.0, exits=(ExitScore(3, 0.4, 1.0), ExitScore(5, 0.6, 1.0)))
    store.add_evaluation(2, "e", 0.7, 4.0)  # accuracy alone: not an exit evaluation
    got = store.exit_evaluations()
    assert [(e.version, e.accuracy, e.loss) for e in got] == [(0, 0.1, 9.0), (1, 0.6, 2.0)]
    assert got[1].exits == (ExitScore(3, 0.4, 1.0), ExitScore(5, 0.6, 1.0))  # by position
