"""Consistent backups of the SQLite audit database while the agent serves.

SQLite's online backup API copies a consistent snapshot page by page without stopping writers.
A backup is written to a temporary name, fsynced and renamed, so a file under its final name
is complete. The spool and result files are not part of it (see docs/operations.md).
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

from agent.clock import utcnow
from agent.errors import ConfigError

PREFIX = "strnet-"
SUFFIX = ".db"


def sqlite_path(database_url: str) -> Path:
    if not database_url.startswith("sqlite:///"):
        raise ConfigError("agent.database_url", "strnet db backup handles SQLite; back up PostgreSQL with pg_dump")
    return Path(database_url.removeprefix("sqlite:///"))


def backup_sqlite(database_url: str, dest: Path) -> Path:
    """Copy the live database to ``dest`` (a file, or a folder to put a dated file in)."""
    src = sqlite_path(database_url)
    if not src.is_file():
        raise ConfigError("agent.data_dir", f"no database at {src}")
    if dest.is_dir():
        dest = dest / f"{PREFIX}{utcnow():%Y%m%dT%H%M%S}{SUFFIX}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(tmp)
    try:
        source.backup(target, pages=1024, sleep=0.005)
        # a self-contained file: no -wal/-shm companions next to the backup
        target.execute("PRAGMA journal_mode=DELETE")
        ok = target.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        target.close()
        source.close()
    if ok != "ok":
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"backup failed its integrity check: {ok}")
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    return dest


def prune(folder: Path, keep_days: float, now: float | None = None) -> list[Path]:
    """Delete our dated backups older than ``keep_days``; returns what was deleted."""
    cutoff = (now or time.time()) - keep_days * 86400
    removed = []
    for f in folder.glob(f"{PREFIX}*{SUFFIX}"):
        if f.stat().st_mtime < cutoff:
            f.unlink()
            removed.append(f)
    return removed


def newest(folder: Path) -> Path | None:
    files = sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))
    return files[-1] if files else None


def is_due(folder: Path, every: timedelta) -> bool:
    last = newest(folder)
    if last is None:
        return True
    return datetime.fromtimestamp(last.stat().st_mtime) < datetime.now() - every
