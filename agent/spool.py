"""Durable spool of received instances.

Files are named by us (a random hex name under a date folder), never by a tag value, written
to a temporary name, fsynced, renamed into place and the directory fsynced, so a file that
exists under its final name is complete. Only then may the job row be committed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from agent.clock import utcnow
from agent.errors import StorageError

TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
SUFFIX = ".dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory. Paths handed out are relative to its root.

    ``node_dir`` (shared storage: the agent's node name): this agent's own folder under a root that
    every agent mounts. Its writes in progress, new files, quarantine and start-up adoption stay
    in it, so no agent ever deletes or adopts another's file; any agent reads any path.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0, node_dir: str = "") -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.node_dir = node_dir
        self.base = root / node_dir if node_dir else root
        (self.base / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def has_room_for(self, size: int) -> bool:
        return shutil.disk_usage(self.root).free - size >= self.min_free_bytes

    def write(self, chunks: list[bytes]) -> str:
        """Write ``chunks`` durably under a random name; return the relative path."""
        return self.write_named(self.new_name(), chunks)

    def write_named(self, rel: str, chunks: list[bytes]) -> str:
        """Write ``chunks`` durably to ``rel`` (a name of ours, replaced atomically). Raises StorageError."""
        day, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
        final_dir = self.root / day if day else self.root
        tmp = self.base / TMP_DIR / (secrets.token_hex(8) + ".part")
        try:
            final_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final_dir / name)
            _fsync_dir(final_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"spool write failed: {exc.strerror}") from exc
        return rel

    @property
    def tmp_dir(self) -> Path:
        """Where writes in progress live (``*.part``), on the spool's own file system."""
        return self.base / TMP_DIR

    @staticmethod
    def sync_part(part: Path) -> None:
        """fsync a complete file in ``tmp_dir``: what ``keep`` needs first (may run early)."""
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def new_name(self) -> str:
        """A fresh relative path in today's folder (what ``keep`` and ``write`` name files)."""
        prefix = f"{self.node_dir}/" if self.node_dir else ""
        return f"{prefix}{utcnow():%Y%m%d}/{secrets.token_hex(16)}{SUFFIX}"

    def keep(self, part: Path, rel: str | None = None) -> str:
        """Keep a complete file of ``tmp_dir``, already fsynced (``sync_part``), under ``rel``
        (default: a new name); return the relative path.

        The same steps as ``write`` after its fsync: rename into the day's folder, fsync that
        folder. Raises StorageError.
        """
        rel = rel or self.new_name()
        day, name = rel.rsplit("/", 1)
        final_dir = self.root / day
        try:
            final_dir.mkdir(parents=True, exist_ok=True)
            os.replace(part, final_dir / name)
            _fsync_dir(final_dir)
        except OSError as exc:
            raise StorageError(f"spool write failed: {exc.strerror}") from exc
        return rel

    def path(self, rel: str) -> Path:
        """Absolute path of a spool entry; refuses anything that would leave the spool."""
        p = (self.root / rel).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError("spool path outside the spool")
        return p

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def entries(self) -> Iterator[str]:
        """Every complete file in the spool (shared storage: in this agent's folder), as relative paths."""
        prefix = f"{self.node_dir}/" if self.node_dir else ""
        for day in sorted(self.base.iterdir()):
            if not day.is_dir() or day.name in (TMP_DIR, QUARANTINE_DIR):
                continue
            for f in sorted(day.glob("*" + SUFFIX)):
                yield f"{prefix}{day.name}/{f.name}"

    def quarantine(self, rel: str) -> None:
        """Move an unreadable file aside for a person to look at."""
        src = self.path(rel)
        target = self.base / QUARANTINE_DIR
        target.mkdir(exist_ok=True)
        src.rename(target / src.name)

    def clear_partials(self, older_than_s: float = 0.0) -> int:
        """Delete temporary files of writes that never completed (never acknowledged).

        At start-up all of them; while running (``older_than_s`` > 0) only those untouched for
        that long: a transfer that broke off leaves its ``.part`` file behind.
        """
        n = 0
        cutoff = time.time() - older_than_s
        for f in (self.base / TMP_DIR).glob("*.part"):
            try:
                if older_than_s and f.stat().st_mtime > cutoff:
                    continue
                f.unlink(missing_ok=True)
            except OSError:
                continue
            n += 1
        return n
