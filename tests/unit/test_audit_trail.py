"""The hash-chained audit trail detects edits, deletions and reordering."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, update

from agent.audit import trail
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent


@pytest.fixture()
def db(db_url: str) -> Database:
    d = Database(db_url)
    upgrade(d)
    with d.transaction() as s:
        for i in range(5):
            trail.append(s, "patient_record", actor=f"user{i}", action="R", object_id=str(i), detail={"n": i})
    return d


def test_intact_chain_verifies(db: Database) -> None:
    with db.reading() as s:
        report = trail.verify(s)
    assert report.ok and report.events == 5


def test_edited_row_breaks_the_chain(db: Database) -> None:
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == 3).values(actor="mallory"))
    with db.reading() as s:
        report = trail.verify(s)
    assert not report.ok and report.first_bad_id == 3


def test_deleted_row_breaks_the_chain(db: Database) -> None:
    with db.transaction() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.id == 2))
    with db.reading() as s:
        report = trail.verify(s)
    assert not report.ok and report.first_bad_id == 3


def test_reordered_rows_break_the_chain(db: Database) -> None:
    """Two whole rows (content and hashes) swapped in place: each still hashes, the link does not."""
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == 2).values(id=100))
        s.execute(update(AuditEvent).where(AuditEvent.id == 3).values(id=2))
        s.execute(update(AuditEvent).where(AuditEvent.id == 100).values(id=3))
    with db.reading() as s:
        report = trail.verify(s)
    assert not report.ok and report.first_bad_id == 2 and report.problem == "previous-hash link broken"
