"""The SuperLink's state database waits for a held write lock instead of failing the request.

Flower keeps every payload chunk in the SuperLink's SQLite file; a write that finds the lock held
longer than SQLite's busy timeout fails with "database is locked" (HTTP 500 to the caller, which
stops a SuperNode's loop or a ServerApp's heartbeat). ``fedmerge.federation.superlink_main``
starts the SuperLink with a busy timeout that outlasts such a lock. These tests hold the lock
from a second connection and write through Flower's own SQL object store, as the SuperLink does.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest


def _hold_write_lock(db: str, seconds: float, taken: threading.Event) -> threading.Thread:
    def hold() -> None:
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        con.execute("COMMIT")
        con.close()

    t = threading.Thread(target=hold)
    t.start()
    return t


def _store_one_object(tmp_path, monkeypatch, busy_timeout_ms: int) -> float:
    """Open Flower's SQL object store with the given busy timeout, hold the lock 3 s, write once."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore import sql_mixin
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    from fedmerge.flower_internals import patch_sqlite_busy_timeout

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after the test
    patch_sqlite_busy_timeout(busy_timeout_ms)
    db = str(tmp_path / "state.db")
    store = SqlObjectStore(db)
    store.initialize()
    record = RecordDict({"c": ConfigRecord({"x": 1})})
    taken = threading.Event()
    holder = _hold_write_lock(db, 3.0, taken)
    taken.wait(10)
    t0 = time.monotonic()
    try:
        store.preregister(1, get_object_tree(record))
    finally:
        holder.join()
    assert record.object_id in store
    return time.monotonic() - t0


def test_write_waits_for_a_lock_held_longer_than_flowers_timeout(tmp_path, monkeypatch):
    from fedmerge.flower_internals import BUSY_TIMEOUT_MS

    assert BUSY_TIMEOUT_MS >= 60_000
    waited = _store_one_object(tmp_path, monkeypatch, BUSY_TIMEOUT_MS)
    assert waited >= 2.5  # it did wait for the holder, and then succeeded


def test_a_short_busy_timeout_fails_the_same_write(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    with pytest.raises(OperationalError, match="database is locked"):
        _store_one_object(tmp_path, monkeypatch, 500)

