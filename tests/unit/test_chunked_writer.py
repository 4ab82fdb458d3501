"""The spooling file's descriptor belongs to its writer thread (agent/ingest/chunked.py).

A descriptor closed by another thread than the one writing to it can be closed twice, or written
after its close; by then the kernel may have handed the same number to a new association's socket
or another spool file (seen once in CI as a fuzzed-PDU run whose next association was cut off).
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.compat.pynetdicom_internals import FILE_HEAD_WRITES
from agent.ingest import chunked
from agent.ingest.chunked import SpoolingFile

# the file head as pynetdicom's chunked receive writes it (problems() checks the count in its probe)
PYNETDICOM_HEAD_WRITES = (b"\x00" * 128, b"DICM", b"meta-not-parsed")


def _head(meta: Any, thread: Any) -> bytes:
    return b"HEAD"


def _feed(f: SpoolingFile, payload: bytes) -> None:
    assert len(PYNETDICOM_HEAD_WRITES) == FILE_HEAD_WRITES
    for part in (*PYNETDICOM_HEAD_WRITES, payload):
        f.write(part)


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that close a descriptor inside the chunked module."""
    seen: list[str] = []
    real_close = os.close

    def recording_close(fd: int) -> None:
        seen.append(threading.current_thread().name)
        real_close(fd)

    monkeypatch.setattr(chunked.os, "close", recording_close)
    return seen


def test_only_the_writer_thread_closes_the_descriptor(tmp_path: Path, closes: list[str]) -> None:
    synced = SpoolingFile(tmp_path, _head)
    _feed(synced, b"a" * 3_000_000)
    synced.data()
    synced.sync()
    synced.close()
    synced.close()  # pynetdicom closes again later: nothing happens twice

    dropped = SpoolingFile(tmp_path, _head)  # a transfer that broke off, freed by the collector
    _feed(dropped, b"b" * 1000)
    name = dropped.name
    del dropped
    gc.collect()

    discarded = SpoolingFile(tmp_path, _head)
    _feed(discarded, b"c" * 1000)
    discarded.close()
    closers = [threading.Thread(target=discarded.close) for _ in range(4)]  # racing closes
    for t in closers:
        t.start()
    for t in closers:
        t.join()

    deadline = 50
    while len(closes) < 3 and deadline:  # the dropped file's writer closes on its own, soon
        threading.Event().wait(0.05)
        deadline -= 1
    assert closes == ["strnet-spool-writer"] * 3
    assert not Path(name).exists()
    assert Path(synced.name).read_bytes() == b"HEAD" + b"a" * 3_000_000


def test_sync_after_a_discard_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    f = SpoolingFile(tmp_path, _head)
    _feed(f, b"x" * 10)
    f.close()  # the association ended before the handler asked for the fsync
    with pytest.raises(OSError):
        f.sync()


def test_an_abort_and_a_close_reported_at_once_discard_the_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom reports an A-ABORT and the connection's close on two threads, and both discard
    the association's broken transfers: the file is deleted and counted once (make test saw the
    log event say two files for one)."""
    import time

    assoc = object()
    f = SpoolingFile(tmp_path, _head)
    _feed(f, b"d" * 1000)
    f.owner = assoc
    real_close = SpoolingFile.close

    def slow_close(self: SpoolingFile) -> None:  # both threads look before either has closed
        time.sleep(0.2)
        real_close(self)

    monkeypatch.setattr(SpoolingFile, "close", slow_close)
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(chunked.discard(assoc))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counts) == [0, 1]
    assert not Path(f.name).exists()
