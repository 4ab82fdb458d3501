"""The durability invariants checked after every crash run (issue 6, docs/architecture.md).

Reads the data directory's database on the engine under test (``conftest.database_of``: SQLite's
file or the PostgreSQL database of the throwaway cluster) and the data directory; the audit chain goes
through ``agent.audit.trail.verify``. Each check returns a list of human-readable violations, so
a failing run says everything that is wrong at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from conftest import database_of
from sqlalchemy import text

from agent.audit import trail
from agent.db.engine import Database

TERMINAL_JOB = {"DONE", "SKIPPED", "DEAD"}
PENDING_JOB = {"RECEIVED", "QUEUED", "RUNNING", "FAILED"}
TERMINAL_OUTBOX = {"DELIVERED", "DEAD"}


def rows(data_dir: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    """The rows of one read-only query on ``data_dir``'s database."""
    db = Database(database_of(data_dir))
    try:
        return _rows(db, sql)
    finally:
        db.dispose()


def _rows(db: Database, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with db.reading() as s:
        return [tuple(r) for r in s.execute(text(sql)).all()]


def check(
    data_dir: Path,
    acknowledged: Iterable[str] = (),
    pacs_uids: Iterable[str] | None = None,
    settled: bool = False,
) -> list[str]:
    """Every violation of the invariants in ``data_dir``; empty when all hold.

    ``acknowledged``: SOP Instance UIDs the sending peer saw answered 0x0000.
    ``pacs_uids``: SOP Instance UIDs (one entry per C-STORE) the PACS peer accepted, or None.
    ``settled``: the agent has had time to finish: every job terminal, every outbox row final.
    """
    db = Database(database_of(data_dir))
    try:
        return _problems(db, data_dir, acknowledged, pacs_uids, settled)
    finally:
        db.dispose()


def _problems(
    db: Database, data_dir: Path, acknowledged: Iterable[str], pacs_uids: Iterable[str] | None, settled: bool
) -> list[str]:
    problems: list[str] = []
    job_uids = "SELECT i.sop_instance_uid FROM jobs j JOIN instances i ON j.instance_id = i.id"
    jobs_by_uid = Counter(uid for (uid,) in _rows(db, job_uids))
    for uid in acknowledged:
        if jobs_by_uid[uid] == 0:
            problems.append(f"acknowledged instance {uid} has no job")
    allowed = TERMINAL_JOB if settled else TERMINAL_JOB | PENDING_JOB
    for job_id, state in _rows(db, "SELECT id, state FROM jobs"):
        if state not in allowed:
            problems.append(f"job {job_id} in state {state}{' (not terminal)' if settled else ''}")
    # one job per (instance UID, content): a duplicate of the same bytes never makes a second job
    for uid, sha, n in _rows(
        db,
        "SELECT i.sop_instance_uid, i.sha256, count(*) FROM jobs j JOIN instances i ON j.instance_id = i.id "
        "GROUP BY i.sop_instance_uid, i.sha256 HAVING count(*) > 1",
    ):
        problems.append(f"instance {uid} ({sha[:8]}) has {n} jobs")
    outbox = _rows(db, "SELECT sop_instance_uid, destination, state FROM outbox")
    for (uid, dest), n in Counter((u, d) for u, d, _ in outbox).items():
        if n > 1:
            problems.append(f"outbox holds {uid} for {dest} {n} times")
    if settled:
        for uid, dest, state in outbox:
            if state not in TERMINAL_OUTBOX:
                problems.append(f"outbox {uid} -> {dest} is {state}, not DELIVERED or DEAD")
    if pacs_uids is not None:
        received = set(pacs_uids)
        for uid, _dest, state in outbox:
            if state == "DELIVERED" and uid not in received:
                problems.append(f"outbox says {uid} was delivered but the PACS peer does not hold it")
        expected = {uid for uid, _d, _s in outbox}
        for uid in received - expected:
            problems.append(f"the PACS peer holds {uid}, which is not in the outbox (a stray result UID)")
    for key, n in _rows(db, "SELECT patient_key, count(*) FROM patients_flagged GROUP BY patient_key"):
        if n > 1:
            problems.append(f"patient {key!r} flagged {n} times")
    for _pid, n in _rows(
        db, "SELECT patient_id, count(*) FROM patients_flagged WHERE patient_id IS NOT NULL GROUP BY patient_id"
    ):
        if n > 1:
            problems.append(f"patient id flagged {n} times")
    known = {p for (p,) in _rows(db, "SELECT spool_path FROM instances")}
    spool = data_dir / "spool"
    for f in sorted(spool.glob("*/*.dcm")):
        rel = f"{f.parent.name}/{f.name}"
        if f.parent.name not in ("tmp", "quarantine") and rel not in known:
            problems.append(f"spool file {rel} has no instance row")
    for f in sorted((spool / "quarantine").glob("*")) if (spool / "quarantine").exists() else []:
        problems.append(f"spool file {f.name} was quarantined")
    with db.reading() as s:
        report = trail.verify(s)
    if not report.ok:
        problems.append(f"audit chain broken at event {report.first_bad_id}: {report.problem}")
    return problems
