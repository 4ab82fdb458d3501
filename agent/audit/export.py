"""The audit trail, exported to the hospital's audit repository (IHE ATNA): in order, from a cursor.

``atna_export`` (one row) holds the id of the last audit event the repository has; each run sends the
events after it, oldest first, in batches, and moves the cursor only once a batch is delivered
(syslog.py says when that is). A failure keeps the cursor and waits with backoff
(``BACKOFF_BASE_S`` doubling to ``BACKOFF_MAX_S``), so every event arrives at least once and in
order; an event goes twice only when a batch broke off after the collector had read part of it.
``strnet serve`` runs ``Exporter.run`` every few seconds (scheduler), ``strnet db export-audit`` once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.audit.atna import Row, StudyContext, audit_message
from agent.audit.syslog import Transport, rfc5424, transport_for
from agent.clock import utcnow
from agent.config import Settings
from agent.db.engine import Database
from agent.db.models import AtnaExport, AuditEvent, Instance, OutboxItem, Study
from agent.errors import TransientError, reason_of
from agent.logging import get_logger

log = get_logger(__name__)

BATCH = 200
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 300.0
CURSOR_ID = 1


@dataclass(frozen=True)
class ExportState:
    last_event_id: int
    backlog: int  # audit events not yet delivered
    attempts: int  # failed deliveries since the last success
    last_error: str | None


@dataclass(frozen=True)
class RunResult:
    sent: int
    backlog: int
    error: str | None = None
    waiting: bool = False  # in backoff: nothing tried


def _cursor(s: Session) -> AtnaExport:
    row = s.get(AtnaExport, CURSOR_ID)
    if row is None:
        row = AtnaExport(id=CURSOR_ID, last_event_id=0, attempts=0, updated_at=utcnow())
        s.add(row)
        s.flush()
    return row


def state(db: Database) -> ExportState:
    """Where the export stands (the status page, /metrics, the CLI)."""
    with db.reading() as s:
        row = s.get(AtnaExport, CURSOR_ID)
        last = row.last_event_id if row else 0
        backlog = s.execute(select(func.count()).select_from(AuditEvent).where(AuditEvent.id > last)).scalar_one()
        return ExportState(last, int(backlog), row.attempts if row else 0, row.last_error if row else None)


def _study_context(s: Session, ev: AuditEvent) -> StudyContext | None:
    """The study an instance, report or study event touched, read from the database."""
    study: Study | None = None
    sop_class = sop_instance = None
    if ev.object_type == "instance" and ev.object_id:
        inst = s.execute(
            select(Instance).where(Instance.sop_instance_uid == ev.object_id).order_by(Instance.id).limit(1)
        ).scalar_one_or_none()
        if inst is not None:
            study, sop_class, sop_instance = inst.study, inst.sop_class_uid, inst.sop_instance_uid
    elif ev.object_type == "report" and ev.object_id:
        study_id = (ev.detail or {}).get("study_id")
        study = s.get(Study, study_id) if isinstance(study_id, int) else None
        sop_instance = ev.object_id
        sop_class = s.execute(
            select(OutboxItem.sop_class_uid).where(OutboxItem.sop_instance_uid == ev.object_id).limit(1)
        ).scalar_one_or_none()
    elif ev.object_type == "study" and ev.object_id:
        if ev.object_id.isdigit():  # a study row's id (a failed SR build)
            study = s.get(Study, int(ev.object_id))
        else:  # a Study Instance UID (a sweep's retrieve: the study may not have arrived yet)
            study = s.execute(select(Study).where(Study.study_instance_uid == ev.object_id)).scalar_one_or_none()
            if study is None:
                return StudyContext(ev.object_id)
    if study is None:
        return None
    return StudyContext(study.study_instance_uid, study.patient_id, study.patient_name, sop_class, sop_instance)


def _row(ev: AuditEvent) -> Row:
    return Row(ev.id, ev.at, ev.event_code, ev.event_name, ev.action, ev.outcome, ev.actor, ev.object_type,
               ev.object_id, ev.detail)  # fmt: skip


class Exporter:
    """Sends the audit events after the cursor to the repository, in order, and moves the cursor."""

    def __init__(self, db: Database, settings: Settings, transport: Transport | None = None) -> None:
        self.db, self.cfg = db, settings.atna
        self.local_id = settings.scp.ae_title
        self.transport = transport if transport is not None else transport_for(self.cfg)

    def messages(self, events: Sequence[AuditEvent], s: Session) -> list[bytes]:
        return [
            rfc5424(audit_message(_row(ev), source_id=self.cfg.audit_source_id, local_id=self.local_id,
                                  ctx=_study_context(s, ev)),
                    at=ev.at, outcome=ev.outcome, app_name=self.cfg.app_name)  # fmt: skip
            for ev in events
        ]

    def run(self, *, ignore_backoff: bool = False, max_batches: int | None = None) -> RunResult:
        """Send batches until the backlog is empty or a delivery fails. ``ignore_backoff``: try now
        (the CLI); else a run within the backoff after a failure does nothing."""
        sent = 0
        batches = 0
        while max_batches is None or batches < max_batches:
            with self.db.reading() as s:
                cur = s.get(AtnaExport, CURSOR_ID)
                last = cur.last_event_id if cur else 0
                if (not ignore_backoff and cur is not None and cur.next_attempt_at is not None
                        and cur.next_attempt_at > utcnow()):  # fmt: skip
                    return RunResult(sent, state(self.db).backlog, cur.last_error, waiting=True)
                events = list(
                    s.execute(select(AuditEvent).where(AuditEvent.id > last).order_by(AuditEvent.id).limit(BATCH))
                    .scalars()
                    .all()
                )
                payload = self.messages(events, s)
            if not events:
                break
            try:
                self.transport.deliver(payload)
            except TransientError as exc:
                reason = reason_of(exc)
                self._failed(reason)
                log.warning("atna_export_failed", reason=reason, backlog=state(self.db).backlog)
                return RunResult(sent, state(self.db).backlog, reason)
            self._advance(last, events[-1].id)
            sent += len(events)
            batches += 1
        backlog = state(self.db).backlog
        if sent:
            log.info("atna_exported", events=sent, backlog=backlog)
        return RunResult(sent, backlog)

    def _advance(self, expected: int, last_id: int) -> None:
        with self.db.transaction() as s:
            cur = _cursor(s)
            if cur.last_event_id != expected:  # another exporter moved it meanwhile: keep the further one
                cur.last_event_id = max(cur.last_event_id, last_id)
            else:
                cur.last_event_id = last_id
            cur.attempts, cur.next_attempt_at, cur.last_error, cur.updated_at = 0, None, None, utcnow()

    def _failed(self, reason: str) -> None:
        with self.db.transaction() as s:
            cur = _cursor(s)
            cur.attempts += 1
            wait = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (cur.attempts - 1))
            cur.next_attempt_at = utcnow() + timedelta(seconds=wait)
            cur.last_error, cur.updated_at = reason, utcnow()
