"""Records of the retrospective sweep: which archived studies it found, how far each retrieval
got, where a sweep over a date range stands, and the audit events of its queries and retrieves.

A study's row goes pending -> retrieving -> done (or failed, retried by the next sweep). While a
study is ``retrieving`` the instances that arrive for it are the sweep's: their jobs get
``SWEEP_PRIORITY`` and the worker leases live jobs first (agent/queue/store.py). A study whose
row says ``send_results = false`` has its SR and overlays recorded as shadow (not sent).
No PHI here: UIDs, dates, modalities and counts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.audit import trail
from agent.clock import as_utc, utcnow
from agent.db.engine import Database
from agent.db.models import Instance, Job, Result, Study, SweepCursor, SweepStudy
from agent.domain import JobState

SWEEP_PRIORITY = 10  # jobs are leased lowest first; live traffic is 0

PENDING = "pending"
RETRIEVING = "retrieving"
DONE = "done"
FAILED = "failed"
GIVEN_UP = "given_up"  # failed MAX_RETRIEVE_ATTEMPTS times: the sweep goes on without it

#: retrieves of one study before the sweep gives it up (one bad study must not stop the sweep)
MAX_RETRIEVE_ATTEMPTS = 3


@dataclass(frozen=True)
class FoundStudy:
    """A study the sweep would retrieve: its knee series and their instances."""

    study_instance_uid: str
    study_date: str | None
    series: int
    instances: int


# -- asked by the receive and record paths ----------------------------------------------------
def priority_of(session: Session, study_uid: str) -> int:
    """The priority of a job for an instance of ``study_uid``: the sweep's while it retrieves it."""
    state = session.execute(
        select(SweepStudy.state).where(SweepStudy.study_instance_uid == study_uid)
    ).scalar_one_or_none()
    return SWEEP_PRIORITY if state == RETRIEVING else 0


def study_priority(session: Session, study_id: int) -> int:
    """The priority of a result of the whole study (its SR): live (0) if any of its instances came
    live, the sweep's when every one was retrieved by a sweep."""
    lowest = session.execute(
        select(func.min(Job.priority))
        .join(Instance, Instance.id == Job.instance_id)
        .where(Instance.study_id == study_id)
    ).scalar_one_or_none()
    return int(lowest or 0)


def sends_results(session: Session, study_uid: str, priority: int) -> bool:
    """False for a result of a sweep's retrieval (``priority`` the sweep's) of a study whose row
    says ``send_results = false``: to the flagged registry only. A live result of the same study
    (an instance sent by PACS, before or after the sweep) is sent."""
    if priority != SWEEP_PRIORITY:
        return True
    send = session.execute(
        select(SweepStudy.send_results).where(SweepStudy.study_instance_uid == study_uid)
    ).scalar_one_or_none()
    return send is None or bool(send)


#: how long a study's retrieve (or its failure) holds its SR back, in ``sweep.timeout_s``: a
#: retrieve is a few DIMSE operations or HTTP requests, each within the timeout
HOLD_TIMEOUTS = 10


def hold_s(timeout_s: float) -> float:
    """How long after its retrieve started a study's SR waits for the rest of the study."""
    return HOLD_TIMEOUTS * timeout_s


def being_retrieved(db: Database, study_uid: str, hold_for_s: float) -> bool:
    """Whether a sweep is retrieving the study, or its retrieve failed and a later sweep will
    finish it, for at most ``hold_for_s`` after that retrieve started: its SR waits, so a swept
    study gets one SR with all its images. Past that (a sweep killed mid-retrieve, a failed study
    no sweep comes back to) its SR is built from what arrived; a later retrieve brings the rest,
    and a revised SR."""
    with db.reading() as s:
        row = s.execute(
            select(SweepStudy.state, SweepStudy.retrieve_started_at).where(SweepStudy.study_instance_uid == study_uid)
        ).one_or_none()
    if row is None or row.state not in (RETRIEVING, FAILED):
        return False
    started = row.retrieve_started_at
    return started is None or as_utc(started) > utcnow() - timedelta(seconds=hold_for_s)


# -- the sweep's own ---------------------------------------------------------------------------
def already_screened(db: Database, study_uids: list[str]) -> set[str]:
    """Of ``study_uids``: those the agent has screened or is screening (a result, or a job still to
    run), or that a sweep has retrieved or given up before. A study whose retrieve was cut short
    (retrieving or failed) is not among them, whatever of it arrived: it is retrieved again, so
    its SR has all its images."""
    if not study_uids:
        return set()
    busy = [JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value]
    with db.reading() as s:
        with_results = s.execute(
            select(Study.study_instance_uid)
            .join(Result, Result.study_id == Study.id)
            .where(Study.study_instance_uid.in_(study_uids))
        ).scalars()
        in_progress = s.execute(
            select(Study.study_instance_uid)
            .join(Instance, Instance.study_id == Study.id)
            .join(Job, Job.instance_id == Instance.id)
            .where(Study.study_instance_uid.in_(study_uids), Job.state.in_(busy))
        ).scalars()
        swept = s.execute(
            select(SweepStudy.study_instance_uid).where(
                SweepStudy.study_instance_uid.in_(study_uids), SweepStudy.state.in_([DONE, GIVEN_UP])
            )
        ).scalars()
        unfinished = s.execute(
            select(SweepStudy.study_instance_uid).where(
                SweepStudy.study_instance_uid.in_(study_uids), SweepStudy.state.in_([RETRIEVING, FAILED])
            )
        ).scalars()
        return (set(with_results) | set(in_progress) | set(swept)) - set(unfinished)


def record_found(db: Database, pacs: str, found: list[FoundStudy], send_results: bool) -> None:
    """A pending row for each study not seen before (a known study keeps its row)."""
    now = utcnow()
    with db.transaction() as s:
        known = set(
            s.execute(
                select(SweepStudy.study_instance_uid).where(
                    SweepStudy.study_instance_uid.in_([f.study_instance_uid for f in found])
                )
            ).scalars()
        )
        for f in found:
            if f.study_instance_uid in known:
                continue
            s.add(SweepStudy(
                study_instance_uid=f.study_instance_uid, pacs=pacs, study_date=f.study_date, state=PENDING,
                series=f.series, instances=f.instances, send_results=send_results, attempts=0, found_at=now,
            ))  # fmt: skip


def mark_done(db: Database, study_uid: str) -> None:
    """Screened already (live, or by an earlier sweep): nothing to retrieve."""
    with db.transaction() as s:
        row = s.execute(select(SweepStudy).where(SweepStudy.study_instance_uid == study_uid)).scalar_one()
        if row.state != DONE:
            row.state, row.done_at = DONE, utcnow()


def begin_retrieve(db: Database, study_uid: str, actor: str, detail: dict[str, Any]) -> None:
    """The study is being retrieved from now on (instances arriving for it are the sweep's), with
    the Begin Transferring DICOM Instances audit event, in one commit."""
    with db.transaction() as s:
        row = s.execute(select(SweepStudy).where(SweepStudy.study_instance_uid == study_uid)).scalar_one()
        row.state = RETRIEVING
        row.attempts += 1
        row.retrieve_started_at = utcnow()
        trail.append(s, "begin_transferring", actor=actor, action="R", object_type="study", object_id=study_uid,
                     detail={"pacs": row.pacs, **detail})  # fmt: skip


def end_retrieve(db: Database, study_uid: str, error: str | None) -> str:
    """Retrieved (``error`` None): done; else failed, with the reason (no PHI), retried later, or
    given up after MAX_RETRIEVE_ATTEMPTS (its SR is then built from what arrived). Returns the
    study's new state."""
    with db.transaction() as s:
        row = s.execute(select(SweepStudy).where(SweepStudy.study_instance_uid == study_uid)).scalar_one()
        if error is None:
            row.state, row.done_at, row.last_error = DONE, utcnow(), None
        else:
            row.state, row.last_error = (GIVEN_UP if row.attempts >= MAX_RETRIEVE_ATTEMPTS else FAILED), error
        return str(row.state)


def retrieves_since(db: Database, since: datetime) -> list[datetime]:
    """When each retrieval started after ``since`` (oldest first): the rate limit counts these."""
    with db.reading() as s:
        rows = s.execute(
            select(SweepStudy.retrieve_started_at)
            .where(SweepStudy.retrieve_started_at >= since)
            .order_by(SweepStudy.retrieve_started_at)
        ).scalars()
        return [r for r in rows if r is not None]


def audit_query(db: Database, actor: str, pacs: str, level: str, detail: dict[str, Any], outcome: int = 0) -> None:
    """A C-FIND as a PS3.15 Query event (keys and counts, no PHI)."""
    with db.transaction() as s:
        trail.append(s, "query", actor=actor, action="E", outcome=outcome, object_type=f"{level.lower()}_query",
                     object_id=pacs, detail=detail)  # fmt: skip


def cursor(db: Database, key: str) -> tuple[str, bool] | None:
    """(next study date to sweep as YYYYMMDD, finished) of the sweep ``key``; None if never run."""
    with db.reading() as s:
        row = s.execute(select(SweepCursor).where(SweepCursor.key == key)).scalar_one_or_none()
        return None if row is None else (row.next_date, bool(row.finished))


def set_cursor(db: Database, key: str, next_date: str, finished: bool = False) -> None:
    with db.transaction() as s:
        row = s.execute(select(SweepCursor).where(SweepCursor.key == key)).scalar_one_or_none()
        if row is None:
            s.add(SweepCursor(key=key, next_date=next_date, finished=finished, updated_at=utcnow()))
        else:
            row.next_date, row.finished, row.updated_at = next_date, finished, utcnow()


def counts(db: Database) -> dict[str, int]:
    """Swept studies by state (status and heartbeat)."""
    with db.reading() as s:
        return dict(s.execute(select(SweepStudy.state, func.count()).group_by(SweepStudy.state)).all())


STATES = (PENDING, RETRIEVING, DONE, FAILED, GIVEN_UP)


@dataclass(frozen=True)
class SweepProgress:
    """Where one sweep stands (the status page): its cursor, its range and its studies by state."""

    key: str
    pacs: str
    range_from: str | None  # YYYYMMDD; None for the scheduled sweep (sweep.since)
    range_to: str | None  # YYYYMMDD; None for the scheduled sweep (up to yesterday)
    next_date: str  # the first day not yet swept (YYYYMMDD)
    finished: bool
    studies: dict[str, int]  # state -> studies of this PACS in the range
    last_activity: datetime  # UTC, naive (agent/clock.py)


def progress(db: Database) -> list[SweepProgress]:
    """Every sweep cursor, most recently active first, with the studies it found in its range by
    state and when anything last happened (its cursor moved, a retrieve of it started or ended)."""
    out = []
    with db.reading() as s:
        for c in s.execute(select(SweepCursor)).scalars():
            pacs, _, rest = c.key.partition(":")
            first, _, last = rest.partition(":")
            scheduled = not (first.isdigit() and last.isdigit())
            where = [SweepStudy.pacs == pacs]
            if not scheduled:
                where += [SweepStudy.study_date >= first, SweepStudy.study_date <= last]
            by_state = dict(s.execute(
                select(SweepStudy.state, func.count()).where(*where).group_by(SweepStudy.state)
            ).all())  # fmt: skip
            latest = s.execute(
                select(func.max(SweepStudy.retrieve_started_at), func.max(SweepStudy.done_at)).where(*where)
            ).one()
            times = [t for t in (c.updated_at, *latest) if t is not None]
            out.append(SweepProgress(
                c.key, pacs, None if scheduled else first, None if scheduled else last, c.next_date,
                bool(c.finished), {state: int(by_state.get(state, 0)) for state in STATES},
                max(as_utc(t) for t in times),
            ))  # fmt: skip
    return sorted(out, key=lambda p: p.last_activity, reverse=True)


def hour_ago() -> datetime:
    return utcnow() - timedelta(hours=1)
