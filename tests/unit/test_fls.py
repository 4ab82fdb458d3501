"""The fracture-liaison pathway over a real migrated database of the engine under test (SQLite, or
PostgreSQL with STRNET_TEST_DATABASE=postgresql; migration 0008 on SQLite): transitions (every pair),
the radiologist's verdicts per finding, the overdue clock, the monthly evidence, the digest's
overdue list and migration 0008. Rows are written by the agent's own store and registry; the
web and the browser walk it over real screening data (tests/web/test_fls_web.py,
tests/browser/test_fls_browser.py)."""

from __future__ import annotations

import csv
import itertools
import sqlite3
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, update

from agent.audit import trail
from agent.clock import utcnow
from agent.db import fls
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent, Base, FindingAssessment, FlaggedPatient, FollowUpEvent, Job, Result, Study
from agent.db.registry import FOLLOW_UP_STATUSES, upsert_flag
from agent.domain import Eligibility, IncomingInstance, InstanceRef
from agent.ops.digest import write_overdue
from agent.queue import store

_uid = itertools.count(1)


@pytest.fixture()
def db(db_url: str) -> Iterator[Database]:
    """A database of the engine under test (conftest's db_url: on PostgreSQL a fresh one)."""
    d = Database(db_url)
    upgrade(d)
    yield d
    d.dispose()


def screened(db: Database, patient: str, probabilities: list[float], threshold: float = 0.5) -> list[int]:
    """One study of ``patient`` with one image per probability, recorded and flagged as the
    worker does (store.record_instance, then a result row and registry.upsert_flag)."""
    study_uid = f"1.2.826.0.1.{next(_uid)}"
    result_ids = []
    for p in probabilities:
        ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", f"1.2.826.0.2.{next(_uid)}", study_uid, "1.2.3.4",
                          "1.2.840.10008.1.2.1")  # fmt: skip
        n = next(_uid)
        job = store.record_instance(db, IncomingInstance(ref, f"d/{n}.dcm", f"{n:064d}", 10, "TESTSCU",
                                                         "127.0.0.1", Eligibility(True, None),
                                                         patient_id=patient))  # fmt: skip
        with db.transaction() as s:
            j = s.get(Job, job.job_id)
            assert j is not None
            study = s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()
            r = Result(job_id=j.id, instance_id=j.instance_id, study_id=study.id, probability=p, threshold=threshold,
                       bone_loss=p >= threshold, p_osteoporosis_given_bone_loss=0.3, severity="osteopenia",
                       t_score=-1.8, t_score_low=-2.5, t_score_high=-1.1, model_version="t", checkpoint_sha256="0" * 64,
                       created_at=utcnow())  # fmt: skip
            s.add(r)
            s.flush()
            if r.bone_loss:
                upsert_flag(s, study, r)
            result_ids.append(r.id)
    return result_ids


def flagged(db: Database, patient: str) -> FlaggedPatient:
    with db.reading() as s:
        return s.execute(select(FlaggedPatient).where(FlaggedPatient.patient_id == patient)).scalar_one()


def set_state(db: Database, fid: int, status: str, referred_at: datetime | None = None) -> None:
    with db.transaction() as s:
        s.execute(update(FlaggedPatient).where(FlaggedPatient.id == fid).values(status=status, referred_at=referred_at))


def step_args(action: str) -> dict[str, object]:
    return {"measured_t_score": -2.0, "dxa_date": utcnow().date()} if action == "dxa_done" else {}


# the pathway as issue 21 states it, written out here (not read from fls.TRANSITIONS)
ALLOWED = {
    ("confirmed", "dxa_ordered"),
    ("confirmed", "closed"),
    ("rejected", "closed"),
    ("dxa_ordered", "dxa_done"),
    ("dxa_ordered", "closed"),
    ("dxa_done", "treatment"),
    ("dxa_done", "no_treatment"),
    ("treatment", "closed"),
    ("no_treatment", "closed"),
}


def test_every_state_pair_is_allowed_exactly_as_the_pathway_says(db: Database) -> None:
    screened(db, "FLS-1", [0.9])
    fid = flagged(db, "FLS-1").id
    assert set(FOLLOW_UP_STATUSES) == {"new", "confirmed", "rejected", "dxa_ordered", "dxa_done", "treatment",
                                       "no_treatment", "closed"}  # fmt: skip
    for current, action in itertools.product(FOLLOW_UP_STATUSES, fls.FOLLOW_UP_ACTIONS):
        set_state(db, fid, current)
        if (current, action) in ALLOWED:
            assert fls.record_step(db, fid, "coord", action, None, **step_args(action)), (current, action)  # type: ignore[arg-type]
            assert flagged(db, "FLS-1").status == action
        else:
            with pytest.raises(fls.TransitionRefused) as refused:
                fls.record_step(db, fid, "coord", action, None, **step_args(action))  # type: ignore[arg-type]
            assert refused.value.status_code == 409 and refused.value.field == "action"
            assert fls.STATUS_LABELS[action] in str(refused.value), (current, action)
            assert flagged(db, "FLS-1").status == current
    assert fls.record_step(db, 999_999, "coord", "closed", None) is False


def test_a_step_is_audited_with_actor_from_and_to_and_no_note_text(db: Database) -> None:
    screened(db, "FLS-2", [0.9])
    fid = flagged(db, "FLS-2").id
    set_state(db, fid, "confirmed")
    before = utcnow()
    assert fls.record_step(db, fid, "carol", "dxa_ordered", "booked for Doe^Jane")
    fp = flagged(db, "FLS-2")
    assert fp.status == "dxa_ordered" and fp.referred_at is not None and fp.referred_at >= before
    with db.reading() as s:
        ev = s.execute(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).scalar_one()
        assert trail.verify(s).ok
    assert (ev.actor, ev.object_id) == ("carol", str(fid))
    assert ev.detail is not None and (ev.detail["from"], ev.detail["to"]) == ("confirmed", "dxa_ordered")
    assert "Doe" not in str(ev.detail)


@pytest.mark.parametrize(
    ("action", "t", "day", "field"),
    [
        ("dxa_done", None, date(2026, 1, 2), "measured_t_score"),
        ("dxa_done", -11.0, date(2026, 1, 2), "measured_t_score"),
        ("dxa_done", float("nan"), date(2026, 1, 2), "measured_t_score"),
        ("dxa_done", -2.0, None, "dxa_date"),
        ("dxa_done", -2.0, date(1899, 12, 31), "dxa_date"),
        ("dxa_done", -2.0, date.today() + timedelta(days=2), "dxa_date"),
        ("closed", -2.0, None, "measured_t_score"),
        ("closed", None, date(2026, 1, 2), "dxa_date"),
        ("reviewed", None, None, "action"),
    ],
)
def test_an_incomplete_step_is_refused_with_its_field_and_nothing_recorded(
    db: Database, action: str, t: float | None, day: date | None, field: str
) -> None:
    screened(db, "FLS-3", [0.9])
    fid = flagged(db, "FLS-3").id
    set_state(db, fid, "dxa_ordered")
    with pytest.raises(fls.FollowUpInvalid) as refused:
        fls.record_step(db, fid, "coord", action, None, t, day)
    assert refused.value.field == field and refused.value.status_code == 400
    with db.reading() as s:
        assert s.execute(select(FollowUpEvent)).first() is None
    assert flagged(db, "FLS-3").status == "dxa_ordered"


def test_verdicts_per_finding_move_new_to_confirmed_or_rejected_until_the_referral(db: Database) -> None:
    first, second, normal = screened(db, "FLS-4", [0.9, 0.8, 0.1])
    fid = flagged(db, "FLS-4").id
    sid = flagged(db, "FLS-4").last_study_id

    def assessed(before: str, after: str) -> fls.Assessed:
        return fls.Assessed(fid, before, after, sid)

    with pytest.raises(fls.FollowUpInvalid) as no_reason:
        fls.assess_finding(db, first, "rita", "disagree", None)
    assert no_reason.value.field == "reason"
    with pytest.raises(fls.FollowUpInvalid):
        fls.assess_finding(db, first, "rita", "maybe", "x")
    assert fls.assess_finding(db, normal, "rita", "agree", None) is None  # not a flagged image: no finding
    # one of two findings disagreed: still new; both: rejected; one agreed later: confirmed
    assert fls.assess_finding(db, first, "rita", "disagree", "normal trabeculae") == assessed("new", "new")
    assert fls.assess_finding(db, second, "rita", "disagree", "artefact") == assessed("new", "rejected")
    assert fls.assess_finding(db, second, "rex", "agree", "thin cortex") == assessed("rejected", "confirmed")
    assert fls.record_step(db, fid, "carol", "dxa_ordered", None)
    # after the referral a verdict is recorded, the state stays
    assert fls.assess_finding(db, second, "rex", "disagree", "second look") == fls.Assessed(
        fid, "dxa_ordered", "dxa_ordered", sid
    )
    views = fls.assessments_of(db, fid)
    assert [a.verdict for a in views[second]] == ["disagree", "agree", "disagree"]
    assert [(a.actor, a.reason) for a in views[first]] == [("rita", "normal trabeculae")]
    # what an onward report reads: the latest verdict per image, with the study and image UIDs
    with db.reading() as s:
        study_id = s.get(Result, first).study_id  # type: ignore[union-attr]
        rows = list(s.execute(select(FindingAssessment).order_by(FindingAssessment.id)).scalars())
    latest = fls.study_assessments(db, study_id)
    assert [(a.result_id, a.verdict) for a in latest] == [(first, "disagree"), (second, "disagree")]
    assert all(a.sop_instance_uid.startswith("1.2.826.0.2.") and a.study_instance_uid.startswith("1.2.826.0.1.")
               for a in latest)  # fmt: skip
    assert len(rows) == 4  # rows are only added
    with db.reading() as s:
        events = list(s.execute(select(AuditEvent).where(AuditEvent.object_type == "result")).scalars())
    assert [e.detail["verdict"] for e in events if e.detail] == ["disagree", "disagree", "agree", "disagree"]
    assert not any("trabeculae" in str(e.detail) for e in events)


def test_overdue_starts_after_overdue_days_and_ends_with_the_dxa(db: Database, tmp_path: Path) -> None:
    for pid in ("FLS-5", "FLS-6", "FLS-7"):
        screened(db, pid, [0.9])
    now = utcnow()
    late, edge, fresh = (flagged(db, p).id for p in ("FLS-5", "FLS-6", "FLS-7"))
    set_state(db, late, "dxa_ordered", now - timedelta(days=50))
    set_state(db, edge, "dxa_ordered", now - timedelta(days=42))  # exactly 42 days: overdue
    set_state(db, fresh, "dxa_ordered", now - timedelta(days=41, hours=23))
    rows = fls.overdue(db, 42, now)
    assert [(r.id, r.waiting_days) for r in rows] == [(late, 50), (edge, 42)]
    assert fls.is_overdue("dxa_ordered", now - timedelta(days=42), 42, now)
    assert not fls.is_overdue("dxa_ordered", now - timedelta(days=41, hours=23), 42, now)
    assert not fls.is_overdue("dxa_done", now - timedelta(days=90), 42, now)
    assert [r.id for r in fls.overdue(db, 30, now)] == [late, edge, fresh]
    # the digest lists them, longest waiting first; a DXA result takes a patient off the list
    out = write_overdue(db, tmp_path / "digest", 42)
    with out.open(newline="", encoding="utf-8") as fh:
        listed = list(csv.DictReader(fh))
    assert [(int(r["registry_id"]), r["patient_id"], r["overdue_days"]) for r in listed] == [
        (late, "FLS-5", "42"),
        (edge, "FLS-6", "42"),
    ]
    assert int(listed[0]["days_waiting"]) >= 50
    assert fls.record_step(db, late, "carol", "dxa_done", None, -2.7, now.date())
    assert [r.id for r in fls.overdue(db, 42)] == [edge]


def test_evidence_per_month_counts_states_days_to_dxa_and_ppv(db: Database) -> None:
    measured = {"E-1": (-2.7, 10), "E-2": (-1.0, 20), "E-3": (0.5, 40), "E-4": (-1.5, 7)}
    months = {"E-1": "2026-01-05", "E-2": "2026-01-20", "E-3": "2026-01-30", "E-4": "2026-02-03", "E-5": "2026-02-09",
              "E-6": "2026-04-30"}  # fmt: skip
    for pid in months:
        screened(db, pid, [0.9])
    with db.transaction() as s:
        for pid, day in months.items():
            first = datetime.fromisoformat(day + "T09:00:00")
            s.execute(
                update(FlaggedPatient)
                .where(FlaggedPatient.patient_id == pid)
                .values(first_flagged_at=first, status="dxa_ordered")
            )
    for pid, (t, days) in measured.items():
        fp = flagged(db, pid)
        assert fls.record_step(db, fp.id, "carol", "dxa_done", None, t, fp.first_flagged_at.date() + timedelta(days))
    fp = flagged(db, "E-1")
    assert fls.record_step(db, fp.id, "carol", "treatment", None)
    rows = {r.month: r for r in fls.evidence(db)}
    jan, feb, total = rows["2026-01"], rows["2026-02"], rows["all"]
    assert list(rows) == ["2026-01", "2026-02", "2026-03", "2026-04", "all"]
    assert (rows["2026-03"].flagged, rows["2026-03"].dxa_n, rows["2026-03"].ppv_low) == (0, 0, None)  # no flag: zeros
    assert rows["2026-04"].flagged == 1
    assert (jan.flagged, jan.by_state["treatment"], jan.by_state["dxa_done"], jan.dxa_n) == (3, 1, 2, 3)
    assert (jan.days_to_dxa_median, jan.low_n, jan.osteoporosis_n) == (20.0, 2, 1)
    assert jan.ppv_low == pytest.approx(2 / 3) and jan.ppv_osteoporosis == pytest.approx(1 / 3)
    assert (feb.flagged, feb.by_state["dxa_ordered"], feb.dxa_n, feb.days_to_dxa_median, feb.low_n) == (
        2, 1, 1, 7.0, 1,
    )  # fmt: skip
    assert (total.flagged, total.dxa_n, total.days_to_dxa_median, total.low_n, total.osteoporosis_n) == (
        6, 4, 15.0, 3, 1,
    )  # fmt: skip
    cells = dict(zip(fls.EVIDENCE_COLUMNS, fls.evidence_cells(total), strict=True))
    assert (cells["ppv_t_le_-1.0"], cells["ppv_t_le_-2.5"]) == ("0.750", "0.250")
    assert cells["days_flag_to_dxa_median"] == "15"
    assert sum(total.by_state.values()) == 6


def test_migration_0008_turns_reviewed_into_new_and_starts_the_clock_of_the_referred(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(db, "0007")
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:
        con.execute("INSERT INTO studies (id, study_instance_uid, first_received_at, last_received_at, last_calling_ae)"
                    " VALUES (1, '1.2.3', '2026-01-01', '2026-01-01', 'X')")  # fmt: skip
        for fid, status in ((1, "reviewed"), (2, "dxa_ordered")):
            con.execute("INSERT INTO patients_flagged (id, patient_key, status, first_flagged_at, last_flagged_at,"
                        " last_study_id, probability, t_score)"
                        " VALUES (?, ?, ?, '2026-01-01', '2026-01-01', 1, 0.9, -2)",
                        (fid, f"P{fid}", status))  # fmt: skip
        for at in ("2026-02-01 10:00:00.000000", "2026-02-03 10:00:00.000000"):
            con.execute("INSERT INTO follow_up_events (flagged_id, at, actor, action)"
                        " VALUES (2, ?, 'c', 'dxa_ordered')", (at,))  # fmt: skip
    upgrade(db)
    with sqlite3.connect(path) as con:
        got = con.execute("SELECT id, status, referred_at FROM patients_flagged ORDER BY id").fetchall()
    assert got == [(1, "new", None), (2, "dxa_ordered", "2026-02-03 10:00:00.000000")]
    with db.engine.connect() as conn:  # the models and the migration agree on what 0008 touches
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    touched = ("finding_assessments", "patients_flagged", "follow_up_events")
    assert [d for d in diffs if any(t in str(d) for t in touched)] == []
    db.dispose()


def test_the_scheduled_digest_writes_the_overdue_list_beside_the_new_flags(db: Database, tmp_path: Path) -> None:
    from agent.config import load_settings
    from agent.scheduler import build_scheduler
    from agent.spool import Spool

    folder = tmp_path / "digest"
    settings = load_settings(None, search_default=False, digest={"folder": str(folder)}, fls={"overdue_days": 10})
    sched = build_scheduler(db, Spool(tmp_path / "spool"), 3600.0, None, None, settings=settings)
    job = sched.get_job("daily_digest")
    assert job is not None
    job.func()  # what the scheduler runs at [digest] hour_utc
    day = f"{utcnow():%Y%m%d}"
    assert sorted(p.name for p in folder.iterdir()) == [f"strnet-flags-{day}.csv", f"strnet-overdue-{day}.csv"]
    # nobody overdue: a header line only; each file is an export event of the digest
    assert (folder / f"strnet-overdue-{day}.csv").read_text().splitlines() == [
        "registry_id,patient_id,patient_name,referred_at,days_waiting,overdue_days"
    ]
    screened(db, "FLS-8", [0.9])
    set_state(db, flagged(db, "FLS-8").id, "dxa_ordered", utcnow() - timedelta(days=11))
    job.func()
    lines = (folder / f"strnet-overdue-{day}.csv").read_text().splitlines()
    assert len(lines) == 2 and ",FLS-8," in lines[1] and lines[1].endswith(",11,10")
    with db.reading() as s:
        exports = [e for e in s.execute(select(AuditEvent).where(AuditEvent.event_code == "110106")).scalars()]
    last = exports[-1]
    assert (last.actor, (last.detail or {}).get("file")) == ("strnet-digest", f"strnet-overdue-{day}.csv")
    assert sum(1 for e in exports if str((e.detail or {}).get("file", "")).startswith("strnet-overdue-")) == 2
