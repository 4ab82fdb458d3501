"""The writers of one process queue on a lock of their own before SQLite's (agent/db/engine.py),
shared by every Database of the file; a holder that keeps it past the busy timeout fails the
waiter with the process lock's StorageError (SQLite's own would say "database is locked"), and a
forked child starts with the lock free. That a waiter then starts at once instead of sleeping in
SQLite's busy handler is what the screening bench measures (ADR 0012), not asserted here."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from agent.db.engine import Database, _writer_lock, upgrade
from agent.errors import StorageError


def _db(tmp_path: Path, busy_timeout_ms: int = 10_000) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}", busy_timeout_ms=busy_timeout_ms)
    upgrade(db)
    with db.transaction() as s:
        s.execute(text("CREATE TABLE IF NOT EXISTS log (who TEXT)"))
    return db


def test_writers_of_one_process_take_turns(tmp_path: Path) -> None:
    db = _db(tmp_path)
    other = Database(db.url)  # a second engine on the same file shares the lock
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with db.transaction() as s:
            s.execute(text("INSERT INTO log VALUES ('first-begin')"))
            holding.set()
            release.wait(10)
            s.execute(text("INSERT INTO log VALUES ('first-end')"))

    def second() -> None:
        holding.wait(10)
        with other.transaction() as s:
            s.execute(text("INSERT INTO log VALUES ('second')"))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    holding.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    with db.reading() as s:
        order = [r[0] for r in s.execute(text("SELECT who FROM log ORDER BY rowid"))]
    assert order == ["first-begin", "first-end", "second"]


@contextmanager
def _held_by_another_thread(db: Database) -> Iterator[None]:
    """Another thread holds a write transaction of ``db`` for the duration of the block."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.transaction():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        release.set()
        holder.join(10)


def test_a_writer_held_up_past_the_busy_timeout_gets_a_storage_error(tmp_path: Path) -> None:
    db = _db(tmp_path)
    waiter = Database(db.url, busy_timeout_ms=200)  # another engine of the file: the same lock
    with _held_by_another_thread(db):
        with pytest.raises(StorageError, match="another writer of this process"):
            with waiter.transaction() as s:
                s.execute(text("INSERT INTO log VALUES ('never')"))
    with db.transaction() as s:  # and the lock is free again afterwards
        s.execute(text("INSERT INTO log VALUES ('after')"))


def test_a_forked_child_starts_with_the_writer_lock_free(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with _held_by_another_thread(db):  # held by another thread while this one forks
        pid = os.fork()
        if pid == 0:  # the child: no holder thread here, so its lock must be free
            os._exit(0 if _writer_lock(db.url).acquire(timeout=1) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_read_in_progress_does_not_block_a_writer(tmp_path: Path) -> None:
    """docs/architecture.md: reads (`strnet jobs list`) use deferred transactions and do not block
    writers in WAL mode. A reader that took SQLite's write lock (BEGIN IMMEDIATE), or a rollback
    journal (the commit needs every reader gone), would hold the writer past its busy timeout."""
    db = _db(tmp_path)
    writer = Database(db.url, busy_timeout_ms=200)
    with db.reading() as s:
        assert s.execute(text("SELECT count(*) FROM log")).scalar_one() == 0  # the read holds its snapshot
        with writer.transaction() as w:
            w.execute(text("INSERT INTO log VALUES ('written while a read was open')"))
        assert s.execute(text("SELECT count(*) FROM log")).scalar_one() == 0  # still its own snapshot
    with db.reading() as s:
        assert s.execute(text("SELECT count(*) FROM log")).scalar_one() == 1
