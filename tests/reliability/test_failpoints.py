"""Crash consistency: `strnet serve` killed (SIGKILL) at each of the 7 fail points, 5 runs each.

Ingest points (before_fsync, after_fsync, after_commit): ingest only (no worker); a raw-socket
peer (tests/reliability/raw_dicom.py: it notices a dead server at once, where pynetdicom's SCU
waits out its DIMSE timeout) sends 4 instances, the server kills itself on the n-th hit; restart;
the peer resends everything (as a PACS retries what was not acknowledged); invariant check.

Worker and sender points (mid_inference, results_built, mid_send, after_ack): the worker screens
with a tiny STR-Net and sends to a pynetdicom PACS peer; the server kills itself at the point;
restart without the fail point; wait until everything settled; invariant check (including: every
result delivered, the PACS holds each result UID, the outbox has each (UID, destination) once).

How the process is started is in serve_fork.py (forked by default to keep 35 runs inside
`make test`; STRNET_FAILPOINT_EXEC=1 execs `python -m agent serve` instead).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dicom_factory import knee_dx
from invariants import check, rows
from pacs_peer import PacsPeer
from pydicom.uid import generate_uid
from rel_helpers import serve_config, store_all, store_raw, wait_until
from serve_fork import ServeFork

pytestmark = pytest.mark.slow

RUNS = 5
INGEST_POINTS = ("before_fsync", "after_fsync", "after_commit")
WORKER_POINTS = ("mid_inference", "results_built", "mid_send", "after_ack")
N_INGEST = 4


def _instances(n: int, seed: int) -> list:
    study = generate_uid()
    return [knee_dx(study_uid=study, seed=seed + k, rows=96, cols=80) for k in range(n)]


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("point", INGEST_POINTS)
def test_ingest_crash_loses_nothing_acknowledged(tmp_path: Path, point: str, run: int) -> None:
    data = tmp_path / "var"
    config, port = serve_config(tmp_path / "agent.toml", data)
    nth = run % 3 + 1  # kill on the 1st, 2nd or 3rd instance of the association
    datasets = _instances(N_INGEST, seed=run * 10)
    armed = ServeFork(config, port, tmp_path / "serve1.log", failpoint=f"{point}:{nth}")
    try:
        armed.start()
        acked, _statuses = store_raw(port, datasets)
        assert armed.wait_dead(30), "the fail point did not fire"
        assert armed.killed, f"expected SIGKILL, got wait status {armed.status}"
    finally:
        armed.kill()
    # the instances answered before the crash; the crashing one was never answered Success
    assert len(acked) == nth - 1, acked
    restarted = ServeFork(config, port, tmp_path / "serve2.log")
    try:
        restarted.start()
        problems = check(data, acknowledged=acked)
        assert problems == [], problems
        # the peer resends what it did not see acknowledged (here: everything again)
        again, statuses = store_raw(port, datasets)
        assert statuses == [0] * N_INGEST
        problems = check(data, acknowledged=again)
        assert problems == [], problems
        jobs = rows(data, "SELECT count(*) FROM jobs")[0][0]
        assert jobs == N_INGEST  # no duplicate job for an instance received twice
    finally:
        restarted.kill()  # a clean SIGTERM stop is tested in tests/loopback/test_serve_process.py


def _settled(data: Path, n_objects: int) -> bool:
    jobs = rows(data, "SELECT state FROM jobs")
    out = rows(data, "SELECT state FROM outbox")
    return (
        bool(jobs)
        and all(s in ("DONE", "SKIPPED", "DEAD") for (s,) in jobs)
        and len(out) >= n_objects
        and all(s in ("DELIVERED", "DEAD") for (s,) in out)
    )


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("point", WORKER_POINTS)
def test_worker_and_sender_crash_delivers_everything_once(
    tmp_path: Path, tiny_weights: Path, point: str, run: int
) -> None:
    data = tmp_path / "var"
    peer = PacsPeer()
    config, port = serve_config(tmp_path / "agent.toml", data, worker_weights=tiny_weights, pacs_port=peer.port)
    datasets = _instances(1, seed=100 + run)  # one study, one patient: an overlay and an SR
    n_objects = 2
    # mid_send/after_ack fire per object: vary which one dies (the overlay or the SR)
    nth = run % 2 + 1 if point in ("mid_send", "after_ack") else 1
    armed = ServeFork(config, port, tmp_path / "serve1.log", failpoint=f"{point}:{nth}")
    restarted = ServeFork(config, port, tmp_path / "serve2.log")
    try:
        armed.start()  # fork before the peer's threads exist
        peer.start()
        acked, statuses = store_all(port, datasets)
        assert statuses == [0]
        assert armed.wait_dead(90), "the fail point did not fire"
        assert armed.killed, f"expected SIGKILL, got wait status {armed.status}"
        assert check(data, acknowledged=acked, pacs_uids=peer.uids()) == []
        peer.stop()  # no peer threads while forking
        restarted.start()
        peer.start()
        wait_until(lambda: _settled(data, n_objects), 90, "jobs and outbox to settle")
        problems = check(data, acknowledged=acked, pacs_uids=peer.uids(), settled=True)
        assert problems == [], problems
        states = rows(data, "SELECT state, count(*) FROM outbox GROUP BY state")
        assert states == [("DELIVERED", n_objects)], states
        assert sorted(set(peer.uids())) == sorted(u for (u,) in rows(data, "SELECT sop_instance_uid FROM outbox"))
        assert rows(data, "SELECT count(*) FROM patients_flagged") == [(1,)]
    finally:
        armed.kill()
        restarted.kill()
        peer.stop()
