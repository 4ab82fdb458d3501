"""The outbox: result objects and their delivery state per destination.

States: PENDING -> SENDING -> DELIVERED | RETRY(at) -> DEAD (-> DISCARDED by an admin, with a
reason), and SHADOW (shadow mode: recorded, never sent). To a destination with storage commitment,
SENDING -> SENT (stored; its commitment asked by Transaction UID) -> COMMITTED, or back to RETRY
when the PACS reports a failure or does not answer within the destination's timeout. Every
transition is one committed row change; SENDING rows found at start-up are sent again (the result
UIDs are deterministic, so PACS deduplicates).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import OutboxItem
from agent.domain import OutboxState
from agent.queue.cluster import SOLO, NodeScope, mine, owned
from agent.spool import Spool


@dataclass(frozen=True)
class OutgoingObject:
    """A built result object on disk (path relative to the results folder)."""

    kind: str  # "sr" | "sc" (DICOM objects), "hl7" | "fhir" (messages: agent/ehr/messages.py)
    sop_class_uid: str  # a message's: what it is ("ORU^R01", "Bundle")
    sop_instance_uid: str
    path: str


def write_object(results: Spool, kind: str, data: bytes, sop_class_uid: str, sop_instance_uid: str) -> OutgoingObject:
    """Write a built result object into the results folder, named by its SOP Instance UID."""
    rel = f"{sop_instance_uid}.dcm"  # our own deterministic UID: a safe file name
    results.write_named(rel, [data])
    return OutgoingObject(kind, sop_class_uid, sop_instance_uid, rel)


def write_message(results: Spool, kind: str, data: bytes, label: str, key: str, rel: str) -> OutgoingObject:
    """Write a built message (HL7, FHIR) into the results folder at ``rel`` (a name of ours); its
    outbox rows are keyed by ``key``, the SR's SOP Instance UID."""
    results.write_named(rel, [data])
    return OutgoingObject(kind, label, key, rel)


@dataclass(frozen=True)
class DueItem:
    id: int
    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    attempts: int


def add(
    session: Session,
    study_id: int,
    obj: OutgoingObject,
    destinations: list[str],
    send: bool,
    failed: str | None = None,
    priority: int = 0,
    node: str | None = None,
) -> int:
    """Queue ``obj`` for each destination inside the caller's transaction; existing rows stay.
    ``failed``: the object could not be built; its rows are DEAD with that reason (no PHI).
    ``priority``: 0 for a live study's result, the sweep's (agent/queue/sweeps.py) for a swept one:
    ``lease_due`` sends the lower first. ``node``: the agent whose results folder holds the file
    (agent.node)."""
    now = utcnow()
    added = 0
    for dest in destinations:
        exists = session.execute(
            select(OutboxItem.id).where(
                OutboxItem.sop_instance_uid == obj.sop_instance_uid, OutboxItem.destination == dest
            )
        ).first()
        if exists:
            continue
        session.add(
            OutboxItem(
                kind=obj.kind,
                study_id=study_id,
                destination=dest,
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
                path=obj.path,
                state=(
                    OutboxState.DEAD if failed else OutboxState.PENDING if send else OutboxState.SHADOW
                ).value,
                last_error=failed,
                attempts=0,
                priority=priority,
                node=node,
                created_at=now,
                updated_at=now,
            )
        )
        added += 1
    return added


# A live study's results go before a swept study's (priority), so a live SR never queues behind
# a sweep's hundreds of overlays; within a priority, an SR (~20 KB, what a worklist shows) goes
# before the overlays (~2 MB each) due with it: the shortest first, so the objects wait least.
_SRS_FIRST = case((OutboxItem.kind == "sr", 0), else_=1)


_DUE_COLUMNS = (
    OutboxItem.id,
    OutboxItem.destination,
    OutboxItem.kind,
    OutboxItem.sop_class_uid,
    OutboxItem.sop_instance_uid,
    OutboxItem.path,
    OutboxItem.attempts,
)


def lease_due(db: Database, limit: int = 50, share: int = 1, scope: NodeScope = SOLO) -> list[DueItem]:
    """Due PENDING/RETRY rows, marked SENDING, live results first, then SRs first: at most
    ``limit``, and a ``share``-th of those due (rounded up) so that ``share`` sender threads
    leasing in turn each get some of a burst; ``scope``: the rows this node may send.

    Plain statements, no ORM objects: a lane leases once per object or two, and loading and
    flushing ORM rows was most of a lane's CPU. Node storage: only rows whose file this node wrote;
    shared storage: any row, and the row names this node as the one sending it."""
    now = utcnow()
    leasable = OutboxItem.state.in_([OutboxState.PENDING.value, OutboxState.RETRY.value])
    with db.transaction() as s:
        q = (
            select(*_DUE_COLUMNS)
            .where(leasable)
            .where((OutboxItem.next_attempt_at.is_(None)) | (OutboxItem.next_attempt_at <= now))
            .where(owned(OutboxItem.node, scope))
            .order_by(OutboxItem.destination, OutboxItem.priority, _SRS_FIRST, OutboxItem.id)
            .limit(limit)
        )
        if db.dialect == "postgresql":  # SQLite: BEGIN IMMEDIATE already makes lanes take turns
            q = q.with_for_update(skip_locked=True, of=OutboxItem)
        rows = s.execute(q).all()
        rows = rows[: -(-len(rows) // share)]
        if rows:
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id.in_([r.id for r in rows]), leasable)
                .values(state=OutboxState.SENDING.value, attempts=OutboxItem.attempts + 1, updated_at=now,
                        **({"node": scope.name} if scope.shared and scope.name else {}))
            )
        return [
            DueItem(r.id, r.destination, r.kind, r.sop_class_uid, r.sop_instance_uid, r.path, r.attempts + 1)
            for r in rows
        ]


def unlease(db: Database, item_ids: list[int]) -> None:
    """SENDING rows back to PENDING without counting the attempt (another lane sends them)."""
    with db.transaction() as s:
        s.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(item_ids), OutboxItem.state == OutboxState.SENDING.value)
            .values(state=OutboxState.PENDING.value, attempts=OutboxItem.attempts - 1, updated_at=utcnow())
        )


def _set(db: Database, item_id: int, **values: object) -> None:
    values["updated_at"] = utcnow()
    with db.transaction() as s:
        s.execute(update(OutboxItem).where(OutboxItem.id == item_id).values(**values))


def delivered(db: Database, item_id: int, status_name: str) -> None:
    _set(
        db,
        item_id,
        state=OutboxState.DELIVERED.value,
        last_status=status_name,
        last_error=None,
        delivered_at=utcnow(),
        next_attempt_at=None,
    )


def retry_at(db: Database, item_id: int, when: datetime, status_name: str | None, error: str) -> None:
    _set(db, item_id, state=OutboxState.RETRY.value, next_attempt_at=when, last_status=status_name, last_error=error)


def dead(db: Database, item_id: int, status_name: str | None, error: str) -> None:
    _set(db, item_id, state=OutboxState.DEAD.value, next_attempt_at=None, last_status=status_name, last_error=error)


def replay_dead(db: Database, study_ids: list[int] | None = None) -> int:
    """DEAD rows (of these studies, or all) go back to PENDING with a fresh attempt count."""
    with db.transaction() as s:
        q = update(OutboxItem).where(OutboxItem.state == OutboxState.DEAD.value)
        if study_ids is not None:
            q = q.where(OutboxItem.study_id.in_(study_ids))
        res = s.execute(
            q.values(state=OutboxState.PENDING.value, attempts=0, next_attempt_at=None, updated_at=utcnow())
        )
        return res.rowcount  # type: ignore[attr-defined]


def discard_dead(db: Database, item_id: int, actor: str, reason: str) -> bool:
    """DEAD -> DISCARDED: never sent; the reason is kept in last_error and in the audit trail.
    False when the row is gone or no longer DEAD."""
    with db.transaction() as s:
        o = s.get(OutboxItem, item_id)
        if o is None or o.state != OutboxState.DEAD.value:
            return False
        o.state = OutboxState.DISCARDED.value
        o.last_error = f"discarded by {actor}: {reason} (was: {o.last_error or o.last_status or 'unknown'})"
        o.updated_at = utcnow()
        trail.append(
            s,
            "application_activity",
            actor=actor,
            action="D",
            object_type="outbox_item",
            object_id=str(o.id),
            detail={"change": "dead_letter_discarded", "reason": reason},
        )
        return True


def requeue_sending(db: Database, scope: NodeScope = SOLO) -> int:
    """At start-up: a SENDING row was interrupted, or a SENT one whose storage commitment was never
    asked (the process ended between its C-STORE and the N-ACTION); send it again. Only this
    node's rows: another node's are being sent by it."""
    with db.transaction() as s:
        res = s.execute(
            update(OutboxItem)
            .where(mine(OutboxItem.node, scope))
            .where(
                (OutboxItem.state == OutboxState.SENDING.value)
                | ((OutboxItem.state == OutboxState.SENT.value) & OutboxItem.commitment_uid.is_(None))
            )
            .values(state=OutboxState.PENDING.value, updated_at=utcnow())
        )
        return res.rowcount  # type: ignore[attr-defined]


def count_by_state(db: Database) -> dict[str, int]:
    with db.reading() as s:
        return dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())


def items(db: Database, state: OutboxState | None = None, limit: int | None = None) -> list[OutboxItem]:
    """Outbox rows, oldest first (``limit``: the newest that many, still oldest first)."""
    with db.reading() as s:
        q = select(OutboxItem).order_by(OutboxItem.id.desc() if limit else OutboxItem.id)
        if state is not None:
            q = q.where(OutboxItem.state == state.value)
        if limit:
            q = q.limit(limit)
        rows = list(s.execute(q).scalars())
        return rows[::-1] if limit else rows


def backoff_s(attempt: int, base_s: float, max_s: float, jitter: float) -> float:
    """Exponential backoff: base * 2^(attempt-1), capped, times a jitter factor in [0.5, 1.5)."""
    return min(max_s, base_s * (2 ** max(0, attempt - 1))) * (0.5 + jitter)


def next_attempt(attempt: int, base_s: float, max_s: float, jitter: float) -> datetime:
    return utcnow() + timedelta(seconds=backoff_s(attempt, base_s, max_s, jitter))


# -- storage commitment (agent/pacs/commitment.py speaks it; the rows are kept here) -----------------


@dataclass(frozen=True)
class RetryPolicy:
    """When an object that failed is sent again, and when it is given up (``sender.max_attempts``,
    ``sender.backoff_*``): the sender's rule, also applied to failed or late storage commitments."""

    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def next_at(self, attempts: int) -> datetime:
        return next_attempt(attempts, self.backoff_base_s, self.backoff_max_s, self.jitter())


def _failure(
    attempts: int, policy: RetryPolicy, status_name: str | None, error: str, now: datetime
) -> dict[str, object]:
    """The values that send a row back to RETRY (sent again, then its commitment asked again), or
    DEAD once it has had ``policy.max_attempts`` attempts (``state`` says which)."""
    if attempts >= policy.max_attempts:
        return {"state": OutboxState.DEAD.value, "next_attempt_at": None, "last_status": status_name,
                "last_error": f"gave up after {attempts} attempts: {error}", "updated_at": now}  # fmt: skip
    return {"state": OutboxState.RETRY.value, "next_attempt_at": policy.next_at(attempts), "last_status": status_name,
            "last_error": error, "updated_at": now}  # fmt: skip


def _still_sent(s: Session, item_id: int, transaction_uid: str | None, values: dict[str, object]) -> bool:
    """Apply ``values`` to the row only if it is still SENT under the same storage commitment
    transaction (``transaction_uid``; None: not yet asked): a row another lane has since sent
    again, or that was committed meanwhile, is left alone. True when the row was changed."""
    same_uid = (
        OutboxItem.commitment_uid.is_(None) if transaction_uid is None else OutboxItem.commitment_uid == transaction_uid
    )
    result = s.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item_id, OutboxItem.state == OutboxState.SENT.value, same_uid)
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def stored(db: Database, item_id: int, status_name: str) -> None:
    """C-STORE success to a destination that commits: SENT, its commitment not yet asked."""
    _set(
        db,
        item_id,
        state=OutboxState.SENT.value,
        last_status=status_name,
        last_error=None,
        next_attempt_at=None,
        commitment_uid=None,
        commitment_asked_at=None,
    )


def commitment_asked(db: Database, item_ids: list[int], transaction_uid: str) -> None:
    """These SENT rows are asked for in the storage commitment request ``transaction_uid``
    (recorded before the N-ACTION goes out: the report may arrive before its response)."""
    now = utcnow()
    with db.transaction() as s:
        s.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(item_ids), OutboxItem.state == OutboxState.SENT.value)
            .values(commitment_uid=transaction_uid, commitment_asked_at=now, updated_at=now)
        )


@dataclass(frozen=True)
class CommitmentReport:
    """What one N-EVENT-REPORT of the Storage Commitment Push Model says (UIDs only)."""

    transaction_uid: str
    committed: tuple[str, ...]  # SOP Instance UIDs of Referenced SOP Sequence
    failed: tuple[tuple[str, str], ...]  # (SOP Instance UID, failure reason) of Failed SOP Sequence
    reporter: str  # the calling AE title of the association it came on


@dataclass(frozen=True)
class CommitmentOutcome:
    destination: str | None  # of the rows the transaction asked for (None: no such transaction)
    committed: int
    retried: int
    dead: int
    unknown: int  # UIDs of the report that match no SENT row of the transaction


def record_commitment(
    db: Database, report: CommitmentReport, policy: RetryPolicy, reporters: Mapping[str, str] | None = None
) -> CommitmentOutcome:
    """Apply a storage commitment report to the rows its transaction asked for, in one commit with
    its audit event: committed -> COMMITTED; failed -> RETRY (sent again, asked again) or DEAD
    after ``policy.max_attempts``. Rows no longer SENT under this transaction (timed out, sent
    again or committed meanwhile, even by a writer between this read and its update) are left alone.
    ``reporters``: destination name -> the AE title its reports must come from; a report from
    another AE title changes nothing (a Transaction UID is no secret: it is logged and listed)."""
    now = utcnow()
    committed = set(report.committed)
    failed = dict(report.failed)
    counts = {"committed": 0, "retried": 0, "dead": 0}
    with db.transaction() as s:
        rows = s.execute(
            select(OutboxItem.id, OutboxItem.destination, OutboxItem.sop_instance_uid, OutboxItem.attempts).where(
                OutboxItem.commitment_uid == report.transaction_uid, OutboxItem.state == OutboxState.SENT.value
            )
        ).all()
        matched: set[str] = set()
        expected = reporters.get(rows[0].destination) if (reporters is not None and rows) else None
        if expected is not None and expected.strip() != report.reporter.strip():
            rows = []  # not the destination that was asked: nothing recorded, reported unknown
        for o in rows:
            if o.sop_instance_uid in committed:
                values: dict[str, object] = {
                    "state": OutboxState.COMMITTED.value, "last_status": "committed", "last_error": None,
                    "next_attempt_at": None, "delivered_at": now, "updated_at": now,
                }  # fmt: skip
                outcome = "committed"
            elif o.sop_instance_uid in failed:
                reason = failed[o.sop_instance_uid]
                why = f"storage commitment failed: the PACS reported {reason}"
                values = _failure(o.attempts, policy, reason, why, now)
                outcome = "dead" if values["state"] == OutboxState.DEAD.value else "retried"
            else:
                continue
            if not _still_sent(s, o.id, report.transaction_uid, values):
                continue  # changed since it was read (sent again, committed): not this report's
            counts[outcome] += 1
            matched.add(o.sop_instance_uid)
        destination = rows[0].destination if rows else None
        if matched:
            trail.append(
                s,
                "instances_transferred",
                actor=report.reporter,
                action="R",
                outcome=0 if not failed.keys() & matched else 4,
                object_type="storage_commitment",
                object_id=report.transaction_uid,
                detail={"destination": destination, **counts},
            )
    unknown = len((committed | failed.keys()) - matched)
    return CommitmentOutcome(destination, counts["committed"], counts["retried"], counts["dead"], unknown)


@dataclass(frozen=True)
class Expired:
    id: int
    destination: str
    state: str  # RETRY or DEAD


def expire_commitments(db: Database, timeouts: Mapping[str, float], policy: RetryPolicy) -> list[Expired]:
    """SENT rows whose commitment was not confirmed within their destination's timeout (counted from
    the request, or from the C-STORE while not yet asked) go back to RETRY, or DEAD after
    ``policy.max_attempts``. A destination absent from ``timeouts`` (no longer asking for commitment,
    or no longer configured) has its SENT rows sent again at once, under today's settings."""
    now = utcnow()
    out: list[Expired] = []
    with db.transaction() as s:
        rows = s.execute(
            select(OutboxItem.id, OutboxItem.destination, OutboxItem.attempts, OutboxItem.commitment_uid,
                   OutboxItem.commitment_asked_at, OutboxItem.updated_at)
            .where(OutboxItem.state == OutboxState.SENT.value)
        ).all()  # fmt: skip
        for o in rows:
            timeout_s = timeouts.get(o.destination)
            since = o.commitment_asked_at or o.updated_at
            if timeout_s is not None and since > now - timedelta(seconds=timeout_s):
                continue
            if timeout_s is None:
                error = "stored, storage commitment no longer asked of this destination: sent again"
            elif o.commitment_uid is None:
                error = f"storage commitment not asked within {timeout_s:g} s of the C-STORE"
            else:
                error = f"storage commitment not confirmed within {timeout_s:g} s"
            values = _failure(o.attempts, policy, "commitment_timeout", error, now)
            if _still_sent(s, o.id, o.commitment_uid, values):  # else committed or asked again meanwhile
                out.append(Expired(o.id, o.destination, str(values["state"])))
    return out

