"""PACS and resource faults.

Covered elsewhere, referenced in docs/reliability.md: PACS down and back
(tests/loopback/test_screen_and_send.py::test_pacs_down_then_back_delivers), permanent rejection
(test_permanent_refusal_is_dead_at_once_and_replay_delivers, test_rejected_association_goes_dead),
warning statuses (test_warning_status_counts_as_delivered), out of resources retried
(test_out_of_resources_is_retried_with_backoff), disk full (the free-space watermark:
tests/loopback/test_scp_pynetdicom.py::test_free_disk_watermark_refuses_with_out_of_resources).
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from dicom_factory import knee_dx
from pacs_peer import PACS_AET, PacsPeer
from rel_helpers import serve_config, store_all, wait_until
from screening_helpers import send_study

from agent.domain import OutboxState
from agent.pacs import status
from agent.queue import outbox
from agent.queue.store import list_jobs


def _screening(make_agent: Any, weights: Path, port: int, **sender: Any) -> Any:
    return make_agent(
        worker={"enabled": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 0, "saliency": False},
        reporting={"quiet_period_s": 0.3, "overlay": False},
        sender={"backoff_base_s": 0.2, "backoff_max_s": 0.5, "poll_s": 0.2, "max_attempts": 50, **sender},
        pacs=[{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": port}],
    )


def test_pacs_that_accepts_tcp_and_never_answers_times_out_retries_then_delivers(
    make_agent: Any, tiny_weights: Path
) -> None:
    # a black hole: the kernel completes the TCP handshake (listen backlog), nobody ever reads
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    port = hole.getsockname()[1]
    agent = _screening(make_agent, tiny_weights, port, timeout_s=1.0)
    peer = None
    try:
        send_study(agent, [knee_dx(rows=96, cols=80)])
        wait_until(lambda: any(i.attempts >= 3 for i in outbox.items(agent.db)), 60, "three timed-out attempts")
        (item,) = outbox.items(agent.db)
        assert item.state in (OutboxState.RETRY.value, OutboxState.SENDING.value)
        assert "association failed" in (item.last_error or "") or item.state == OutboxState.SENDING.value
        assert agent.sender._threads and all(t.is_alive() for t in agent.sender._threads)
        hole.close()
        peer = PacsPeer()
        peer.port = port  # a real PACS takes the black hole's place
        peer.start()
        wait_until(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value], 60, "delivery")
        assert len(set(peer.uids())) == 1
    finally:
        hole.close()
        if peer is not None:
            peer.stop()
    # no sender thread is stuck in a socket call: it stops promptly
    t0 = time.monotonic()
    agent.sender.stop(timeout_s=10)
    assert not any(t.is_alive() for t in agent.sender._threads) and time.monotonic() - t0 < 10


class _OtherWriter:
    """Another writer holding the write lock: SQLite's (BEGIN EXCLUSIVE on the file), or on PostgreSQL
    the tables a C-STORE writes, locked EXCLUSIVE (reads go on, writes wait) by a psycopg connection."""

    def __init__(self, agent: Any) -> None:
        url = agent.settings.database_url
        if url.startswith("sqlite"):
            self.con: Any = sqlite3.connect(agent.settings.data_dir / "strnet.db", isolation_level=None, timeout=1,
                                            check_same_thread=False)  # fmt: skip
            self.con.execute("BEGIN EXCLUSIVE")
            self.release: Any = lambda: self.con.execute("ROLLBACK")
        else:
            import psycopg

            self.con = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
            self.con.execute("LOCK TABLE studies, instances, jobs IN EXCLUSIVE MODE")
            self.release = self.con.rollback

    def close(self) -> None:
        self.con.close()


def test_database_locked_by_another_writer_answers_out_of_resources_then_succeeds(make_agent: Any) -> None:
    agent = make_agent(agent={"db_busy_timeout_s": 0.5})
    ds = knee_dx(rows=64, cols=64)
    locker = _OtherWriter(agent)
    # the other writer holds the lock for 3 s: six busy timeouts (with the default 10 s the store
    # would wait and succeed, and this test would fail: the setting is what bounds the wait)
    release = threading.Timer(3.0, locker.release)
    release.start()
    try:
        _acked, statuses = store_all(agent.scp.port, [ds])
        assert statuses == [status.OUT_OF_RESOURCES]
    finally:
        release.join()
        locker.close()
    # nothing half-kept: no job, no spool file; the sender's retry then succeeds
    assert list_jobs(agent.db) == []
    assert [p for p in agent.spool.root.rglob("*.dcm")] == []
    acked, statuses = store_all(agent.scp.port, [ds])
    assert statuses == [status.SUCCESS] and acked == [str(ds.SOPInstanceUID)]
    assert len(list_jobs(agent.db)) == 1


def _serve_fails(tmp_path: Path, name: str, weights: Path) -> subprocess.Popen[str]:
    config, _port = serve_config(tmp_path / f"{name}.toml", tmp_path / name, worker_weights=weights)
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", "--config", str(config), "--no-web"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_missing_or_corrupt_checkpoint_stops_serve_with_exit_2_naming_the_file(
    tmp_path: Path, tiny_weights: Path
) -> None:
    missing = tmp_path / "gone" / "tiny.json"
    corrupt_dir = tmp_path / "corrupt"
    shutil.copytree(tiny_weights.parent, corrupt_dir)
    weights_file = corrupt_dir / "tiny.safetensors"
    weights_file.write_bytes(b"\x00garbage" * 100)  # truncated, wrong content
    procs = {
        "missing": (_serve_fails(tmp_path, "missing", missing), str(missing)),
        "corrupt": (_serve_fails(tmp_path, "corrupt", corrupt_dir / "tiny.json"), "tiny."),
    }
    try:
        for what, (proc, named) in procs.items():
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 2, (what, out[-2000:])
            last = out.strip().splitlines()[-1]
            assert last.startswith("configuration error") and named in last, (what, last)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
