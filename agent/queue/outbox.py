"""The outbox: result objects and their delivery state per destination.

States: PENDING -> SENDING -> DELIVERED | RETRY(at) -> DEAD (-> DISCARDED by an admin, with a
reason), and SHADOW (shadow mode: recorded, never sent). Every transition is one committed row
change; SENDING rows found at start-up are sent again (the result UIDs are deterministic, so PACS
deduplicates).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import OutboxItem
from agent.domain import OutboxState
from agent.spool import Spool


@dataclass(frozen=True)
class OutgoingObject:
    """A built result object on disk (path relative to the results folder)."""

    kind: str  # "sr" | "sc"
    sop_class_uid: str
    sop_instance_uid: str
    path: str


def write_object(results: Spool, kind: str, data: bytes, sop_class_uid: str, sop_instance_uid: str) -> OutgoingObject:
    """Write a built result object into the results folder, named by its SOP Instance UID."""
    rel = f"{sop_instance_uid}.dcm"  # our own deterministic UID: a safe file name
    results.write_named(rel, [data])
    return OutgoingObject(kind, sop_class_uid, sop_instance_uid, rel)


@dataclass(frozen=True)
class DueItem:
    id: int
    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    attempts: int


def add(session: Session, study_id: int, obj: OutgoingObject, destinations: list[str], send: bool) -> int:
    """Queue ``obj`` for each destination inside the caller's transaction; existing rows stay."""
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
                state=(OutboxState.PENDING if send else OutboxState.SHADOW).value,
                attempts=0,
                created_at=now,
                updated_at=now,
            )
        )
        added += 1
    return added


# An SR (~20 KB, what a worklist shows) goes before the overlays (~2 MB each) due with it: the
# shortest first, so the objects wait least on average.
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


def lease_due(db: Database, limit: int = 50, share: int = 1) -> list[DueItem]:
    """Due PENDING/RETRY rows, marked SENDING, SRs first: at most ``limit``, and a ``share``-th of
    those due (rounded up) so that ``share`` sender threads leasing in turn each get some of a burst.

    Plain statements, no ORM objects: a lane leases once per object or two, and loading and
    flushing ORM rows was most of a lane's CPU."""
    now = utcnow()
    leasable = OutboxItem.state.in_([OutboxState.PENDING.value, OutboxState.RETRY.value])
    with db.transaction() as s:
        q = (
            select(*_DUE_COLUMNS)
            .where(leasable)
            .where((OutboxItem.next_attempt_at.is_(None)) | (OutboxItem.next_attempt_at <= now))
            .order_by(OutboxItem.destination, _SRS_FIRST, OutboxItem.id)
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
                .values(state=OutboxState.SENDING.value, attempts=OutboxItem.attempts + 1, updated_at=now)
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


def requeue_sending(db: Database) -> int:
    """At start-up: a SENDING row was interrupted; send it again."""
    with db.transaction() as s:
        res = s.execute(
            update(OutboxItem)
            .where(OutboxItem.state == OutboxState.SENDING.value)
            .values(state=OutboxState.PENDING.value, updated_at=utcnow())
        )
        return res.rowcount  # type: ignore[attr-defined]


def count_by_state(db: Database) -> dict[str, int]:
    with db.reading() as s:
        return dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())


def items(db: Database, state: OutboxState | None = None) -> list[OutboxItem]:
    with db.reading() as s:
        q = select(OutboxItem).order_by(OutboxItem.id)
        if state is not None:
            q = q.where(OutboxItem.state == state.value)
        return list(s.execute(q).scalars())


def backoff_s(attempt: int, base_s: float, max_s: float, jitter: float) -> float:
    """Exponential backoff: base * 2^(attempt-1), capped, times a jitter factor in [0.5, 1.5)."""
    return min(max_s, base_s * (2 ** max(0, attempt - 1))) * (0.5 + jitter)


def next_attempt(attempt: int, base_s: float, max_s: float, jitter: float) -> datetime:
    return utcnow() + timedelta(seconds=backoff_s(attempt, base_s, max_s, jitter))
