import sqlite3

import pytest

from toolkit.aggregator.store import Store, token_hash
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
