"""Engine, sessions and migrations of the audit database.

SQLite is the embedded default: WAL, synchronous=FULL, a busy timeout, foreign keys on, and
every write transaction taken with BEGIN IMMEDIATE so the hash chain and the job queue see one
writer at a time. The URL is a setting; PostgreSQL (psycopg 3, every session in UTC) needs no
change in callers; its sessions wait at most the busy timeout for a lock (``lock_timeout``), as
SQLite's writers do.

The writers of one process (C-STORE handlers, worker, recorder, sender lanes, sweeps, web) also
queue on a lock of their own before BEGIN IMMEDIATE: SQLite lets a writer that finds the database
locked sleep and retry (1, 2, 5, 10 ... 100 ms), so under load the lock sat free while its
waiters slept, and a commit that takes a few milliseconds cost tens. The process lock hands over at
once; SQLite's busy timeout still arbitrates with other processes (CLI commands, backups).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.config import Settings
from agent.errors import ConfigError, StorageError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BUSY_TIMEOUT_MS = 10_000

_writer_locks: dict[str, threading.RLock] = {}  # by URL: every Database of one file shares it
_writer_locks_guard = threading.Lock()


def _writer_lock(url: str) -> threading.RLock | None:
    if not url.startswith("sqlite"):
        return None  # a server database queues its writers itself
    with _writer_locks_guard:
        return _writer_locks.setdefault(url, threading.RLock())


def _fresh_locks_after_fork() -> None:
    # a child forked while a thread held a lock would inherit it held, by a thread it does not have
    global _writer_locks_guard
    _writer_locks_guard = threading.Lock()
    for url in _writer_locks:
        _writer_locks[url] = threading.RLock()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)


def make_engine(url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    """Create the engine; for SQLite apply the durability pragmas on every connection.

    ``busy_timeout_ms`` is how long a writer waits for another writer's lock before the write fails
    (a C-STORE then answers out of resources): a setting, so a test can hold a lock past it.
    """
    url = engine_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
            pool_size=8,
            max_overflow=16,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # let SQLAlchemy's begin() emit our BEGIN IMMEDIATE instead of pysqlite's deferred one
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # writers take the lock up front (no upgrade deadlocks); readers stay deferred
            read_only = conn.get_execution_options().get("strnet_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def _utc_session(dbapi_conn: Any, _record: Any) -> None:
            # every session in UTC, whatever PGTZ or the server's timezone say: times come back in
            # UTC and a naive literal in SQL means UTC (UtcDateTime gives aware UTC either way)
            cur = dbapi_conn.cursor()
            cur.execute("SET TIME ZONE 'UTC'")
            # a write waits for another's lock (a row, a table, the audit chain's advisory lock) at
            # most the busy timeout, then fails (a C-STORE answers 0xA700 and the sender retries)
            cur.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
            cur.close()
            dbapi_conn.commit()

    return engine


def engine_url(url: str) -> str:
    """The URL as SQLAlchemy should get it: SQLite as it is; a plain ``postgresql://`` means psycopg 3,
    which must be installed (the ``postgres`` extra); without it, or for any other database or
    driver, a ConfigError says so instead of a traceback."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("agent.database_url", "not a database URL") from None
    if parsed.get_backend_name() == "sqlite":
        return url
    if parsed.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ConfigError("agent.database_url", "sqlite:///FILE or postgresql://USER@HOST/DATABASE (psycopg 3)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError(
            "agent.database_url",
            "a postgresql URL needs the psycopg driver: pip install 'strnet-agent[postgres]'",
        ) from None
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


class Database:
    """The engine and a session factory; ``transaction()`` wraps errors in our own types."""

    def __init__(self, url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms)
        self._busy_timeout_s = busy_timeout_ms / 1000
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(strnet_read_only=True), expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One committed unit of work; database trouble surfaces as StorageError (transient)."""
        writer = _writer_lock(self.url)  # looked up each time: a forked child has fresh ones
        if writer is not None and not writer.acquire(timeout=self._busy_timeout_s):
            raise StorageError("database unavailable: another writer of this process held it past the busy timeout")
        session = None
        try:
            session = self._sessions()
            with session.begin():
                yield session
        except OperationalError as exc:
            raise StorageError(f"database unavailable: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            if exc.__class__.__name__ == "IntegrityError":
                raise
            raise StorageError(f"database error: {exc.__class__.__name__}") from exc
        finally:
            if session is not None:
                session.close()
            if writer is not None:
                writer.release()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only unit of work that does not take SQLite's write lock."""
        session = self._read_sessions()
        try:
            with session.begin():
                yield session
        except OperationalError as exc:
            raise StorageError(f"database unavailable: {exc.orig}") from exc
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (``strnet db upgrade``)."""
    with db.engine.connect() as conn:
        cfg = alembic_config(db.url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def open_database(settings: Settings, migrate: bool = True) -> Database:
    """The database the settings name, migrated to the newest schema unless ``migrate=False``."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # busy timeout is a setting: a write blocked past it fails cleanly (0xA700), never hangs a C-STORE
    db = Database(settings.database_url, busy_timeout_ms=int(settings.agent.db_busy_timeout_s * 1000))
    if migrate:
        upgrade(db)
    return db
