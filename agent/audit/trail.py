"""The append-only, hash-chained audit trail.

Each row carries the SHA-256 of the previous row's hash and its own canonical content, so a
changed, removed or reordered row breaks the chain. Event codes follow DICOM PS3.15 (DCM codes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from agent.clock import as_utc, utcnow
from agent.db.models import AuditEvent

GENESIS = "0" * 64

# PS3.15 audit message event IDs (DCM) we emit, by our short name.
EVENTS: dict[str, tuple[str, str]] = {
    "instances_transferred": ("110104", "DICOM Instances Transferred"),
    "application_activity": ("110100", "Application Activity"),
    "patient_record": ("110110", "Patient Record"),
    "export": ("110106", "Export"),
    "login": ("110122", "Login"),
    "logout": ("110123", "Logout"),
    "security_alert": ("110113", "Security Alert"),
    "query": ("110112", "Query"),
    "begin_transferring": ("110102", "Begin Transferring DICOM Instances"),
}


def _digest(prev_hash: str, row: dict[str, Any]) -> str:
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def _content(ev: AuditEvent) -> dict[str, Any]:
    return {
        # UTC wall time without a zone, whatever the engine or the session's zone (the format of the
        # first chains, so they still verify)
        "at": as_utc(ev.at).replace(tzinfo=None).isoformat(timespec="microseconds"),
        "event_code": ev.event_code,
        "event_name": ev.event_name,
        "action": ev.action,
        "outcome": ev.outcome,
        "actor": ev.actor,
        "object_type": ev.object_type,
        "object_id": ev.object_id,
        "detail": ev.detail,
    }


def append(
    session: Session,
    kind: str,
    *,
    actor: str,
    action: str = "E",
    outcome: int = 0,
    object_type: str | None = None,
    object_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside the caller's (write) transaction."""
    code, name = EVENTS[kind]
    if session.get_bind().dialect.name == "postgresql":
        # one chain writer at a time across processes
        session.execute(text("SELECT pg_advisory_xact_lock(724242)"))
    last = session.execute(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).scalar()
    prev = last or GENESIS
    ev = AuditEvent(
        at=utcnow(),
        event_code=code,
        event_name=name,
        action=action,
        outcome=outcome,
        actor=actor,
        object_type=object_type,
        object_id=object_id,
        detail=detail,
        prev_hash=prev,
        hash="",
    )
    ev.hash = _digest(prev, _content(ev))
    session.add(ev)
    session.flush()
    return ev


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_id: int | None = None
    problem: str | None = None


def verify(session: Session, batch: int = 5000) -> ChainReport:
    """Walk the whole chain; report the first row that does not link or hash."""
    prev = GENESIS
    count = 0
    last_id = 0
    while True:
        rows = (
            session.execute(select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch))
            .scalars()
            .all()
        )
        if not rows:
            return ChainReport(ok=True, events=count)
        for ev in rows:
            if ev.prev_hash != prev:
                return ChainReport(False, count, ev.id, "previous-hash link broken")
            if _digest(prev, _content(ev)) != ev.hash:
                return ChainReport(False, count, ev.id, "content does not match its hash")
            prev = ev.hash
            count += 1
            last_id = ev.id
