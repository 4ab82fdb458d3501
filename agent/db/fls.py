"""The fracture-liaison (FLS) pathway of a flagged patient: the radiologist's verdict per finding,
the coordinator's steps, the overdue clock and the monthly evidence.

States (``FlaggedPatient.status``)::

    new -> confirmed | rejected       a radiologist's verdicts on the flagged images (assess_finding)
    confirmed -> dxa_ordered | closed  (dxa_ordered is shown as "DXA referred")
    rejected -> closed
    dxa_ordered -> dxa_done | closed   DXA done carries the measured T-score and the scan's date
    dxa_done -> treatment | no_treatment
    treatment | no_treatment -> closed

Every step is one transaction with its audit event (who, from, to); a step the table does not
allow is refused (:class:`TransitionRefused`) and nothing is recorded. Audit details hold row ids
and codes only: notes and reasons are free text and may name the patient.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import FindingAssessment, FlaggedPatient, FollowUpEvent, Instance, Result, Study
from agent.db.registry import FOLLOW_UP_STATUSES, patient_key

STATUS_LABELS = {
    "new": "New",
    "confirmed": "Confirmed",
    "rejected": "Rejected",
    "dxa_ordered": "DXA referred",
    "dxa_done": "DXA done",
    "treatment": "Treatment started",
    "no_treatment": "Treatment not indicated",
    "closed": "Closed",
}
# the coordinator's steps (the follow-up form); confirmed and rejected come from assess_finding
FOLLOW_UP_ACTIONS = ("dxa_ordered", "dxa_done", "treatment", "no_treatment", "closed")
ACTION_LABELS = {a: STATUS_LABELS[a] for a in FOLLOW_UP_ACTIONS}
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "new": (),
    "confirmed": ("dxa_ordered", "closed"),
    "rejected": ("closed",),
    "dxa_ordered": ("dxa_done", "closed"),
    "dxa_done": ("treatment", "no_treatment"),
    "treatment": ("closed",),
    "no_treatment": ("closed",),
    "closed": (),
}
# until the referral, the radiologist's latest verdicts decide between these
ASSESSABLE = ("new", "confirmed", "rejected")
VERDICTS = ("agree", "disagree")
OSTEOPENIA_T = -1.0  # WHO: measured T-score at or below -1.0 is low bone mass
OSTEOPOROSIS_T = -2.5
DXA_DATE_MIN = date(1900, 1, 1)

assert set(STATUS_LABELS) == set(FOLLOW_UP_STATUSES) == set(TRANSITIONS)


class FollowUpInvalid(ValueError):
    """A step that cannot be recorded as submitted; ``field`` names the form field at fault."""

    status_code = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TransitionRefused(FollowUpInvalid):
    """A step the pathway does not allow from the patient's current state (409)."""

    status_code = 409


def next_steps(status: str) -> tuple[str, ...]:
    return TRANSITIONS.get(status, ())


def _refusal(status: str, action: str) -> TransitionRefused:
    allowed = next_steps(status)
    now = STATUS_LABELS.get(status, status)
    if allowed:
        then = " or ".join(f'"{STATUS_LABELS[a]}"' for a in allowed)
        hint = f"from here the next step is {then}."
    elif status in ASSESSABLE:
        hint = "a radiologist first confirms or rejects the flagged images."
    else:
        hint = "no further step is recorded for a closed patient."
    return TransitionRefused("action", f'"{STATUS_LABELS[action]}" cannot follow "{now}": {hint}')


def _check_step(action: str, measured_t_score: float | None, dxa_date: date | None, today: date) -> None:
    if action not in FOLLOW_UP_ACTIONS:
        raise FollowUpInvalid("action", f"Choose an action: {', '.join(ACTION_LABELS.values())}.")
    if action == "dxa_done":
        if measured_t_score is None or not math.isfinite(measured_t_score) or not -10 <= measured_t_score <= 10:
            raise FollowUpInvalid(
                "measured_t_score", "DXA done needs the measured T-score (between -10 and 10), e.g. -2.1."
            )
        if dxa_date is None or not DXA_DATE_MIN <= dxa_date <= today:
            raise FollowUpInvalid("dxa_date", "DXA done needs the day of the scan (YYYY-MM-DD, not in the future).")
        return
    if measured_t_score is not None:
        raise FollowUpInvalid(
            "measured_t_score",
            f'A measured T-score belongs to "DXA done". Choose DXA done to record it, or clear the T-score '
            f'to record "{ACTION_LABELS[action]}".',
        )
    if dxa_date is not None:
        raise FollowUpInvalid(
            "dxa_date", f'A DXA date belongs to "DXA done". Clear it to record "{ACTION_LABELS[action]}".'
        )


def record_step(
    db: Database,
    flagged_id: int,
    actor: str,
    action: str,
    note: str | None,
    measured_t_score: float | None = None,
    dxa_date: date | None = None,
) -> bool:
    """Record a coordinator's step and move the patient's state; audited in the same transaction.

    False when there is no such patient; FollowUpInvalid for a form that is incomplete or wrong
    (a T-score or DXA date with any step but "DXA done" is refused, never dropped);
    TransitionRefused for a step the pathway does not allow from the current state."""
    now = utcnow()
    _check_step(action, measured_t_score, dxa_date, now.date())
    with db.transaction() as s:
        fp = s.get(FlaggedPatient, flagged_id)
        if fp is None:
            return False
        previous = fp.status
        if action not in next_steps(previous):
            raise _refusal(previous, action)
        fp.status = action
        if action == "dxa_ordered":
            fp.referred_at = now
        s.add(
            FollowUpEvent(
                flagged_id=fp.id,
                at=now,
                actor=actor,
                action=action,
                note=note or None,
                measured_t_score=measured_t_score,
                dxa_date=dxa_date,
            )
        )
        trail.append(
            s,
            "patient_record",
            actor=actor,
            action="U",
            object_type="flagged_patient",
            object_id=str(fp.id),
            detail={
                "change": "follow_up",
                "action": action,
                "from": previous,
                "to": action,
                "measured_t_score": measured_t_score,
                "dxa_date": dxa_date.isoformat() if dxa_date else None,
            },
        )
        return True


# -- the radiologist's verdict per finding ------------------------------------------------------
@dataclass(frozen=True)
class Assessed:
    flagged_id: int
    previous: str
    status: str
    study_id: int = 0  # the study of the assessed image


def _status_after(s: Session, fp: FlaggedPatient) -> str:
    """Confirmed when the latest verdict on any flagged image of the patient agrees; rejected when
    every flagged image of the latest positive study has a latest verdict that disagrees; else new."""
    latest: dict[int, str] = {}
    for rid, verdict in s.execute(
        select(FindingAssessment.result_id, FindingAssessment.verdict)
        .where(FindingAssessment.flagged_id == fp.id)
        .order_by(FindingAssessment.id)
    ).all():
        latest[int(rid)] = str(verdict)
    if "agree" in latest.values():
        return "confirmed"
    findings = s.execute(
        select(Result.id).where(Result.study_id == fp.last_study_id, Result.bone_loss.is_(True))
    ).scalars()
    ids = list(findings)
    if ids and all(latest.get(i) == "disagree" for i in ids):
        return "rejected"
    return "new"


def assess_finding(db: Database, result_id: int, actor: str, verdict: str, reason: str | None) -> Assessed | None:
    """A radiologist's verdict on one flagged image (agree or disagree; a disagreement needs its
    reason). Until the patient is referred the verdicts move them between new, confirmed and
    rejected; afterwards the verdict is recorded and the state stays. None when the result is no
    flagged image of a flagged patient."""
    if verdict not in VERDICTS:
        raise FollowUpInvalid("verdict", "Choose agree or disagree.")
    if verdict == "disagree" and not reason:
        raise FollowUpInvalid("reason", "A disagreement needs its reason (e.g. the film shows normal bone).")
    with db.transaction() as s:
        r = s.get(Result, result_id)
        if r is None or not r.bone_loss:
            return None
        st = s.get(Study, r.study_id)
        if st is None:
            return None
        fp = s.execute(select(FlaggedPatient).where(FlaggedPatient.patient_key == patient_key(st))).scalar()
        if fp is None:
            return None
        s.add(
            FindingAssessment(
                result_id=r.id,
                study_id=st.id,
                flagged_id=fp.id,
                at=utcnow(),
                actor=actor,
                verdict=verdict,
                reason=reason or None,
            )
        )
        s.flush()
        previous = fp.status
        if previous in ASSESSABLE:
            fp.status = _status_after(s, fp)
        trail.append(
            s,
            "patient_record",
            actor=actor,
            action="U",
            object_type="result",
            object_id=str(r.id),
            detail={
                "change": "assessment",
                "verdict": verdict,
                "flagged_patient": fp.id,
                "from": previous,
                "to": fp.status,
            },
        )
        return Assessed(fp.id, previous, fp.status, st.id)


def flagged_of_result(db: Database, result_id: int) -> int | None:
    """The flagged patient (row id) whose study holds this result, or None."""
    with db.reading() as s:
        r = s.get(Result, result_id)
        st = s.get(Study, r.study_id) if r is not None else None
        if st is None:
            return None
        fid = s.execute(select(FlaggedPatient.id).where(FlaggedPatient.patient_key == patient_key(st))).scalar()
        return None if fid is None else int(fid)


@dataclass(frozen=True)
class AssessmentView:
    result_id: int
    at: datetime
    actor: str
    verdict: str
    reason: str | None


def assessments_of(db: Database, flagged_id: int) -> dict[int, list[AssessmentView]]:
    """{result id: its verdicts, oldest first} for the patient page."""
    out: dict[int, list[AssessmentView]] = {}
    with db.reading() as s:
        for a in s.execute(
            select(FindingAssessment).where(FindingAssessment.flagged_id == flagged_id).order_by(FindingAssessment.id)
        ).scalars():
            out.setdefault(a.result_id, []).append(AssessmentView(a.result_id, a.at, a.actor, a.verdict, a.reason))
    return out


@dataclass(frozen=True)
class StudyAssessment:
    """The latest verdict on one image of a study, as a message about it needs it."""

    study_instance_uid: str
    sop_instance_uid: str
    result_id: int
    verdict: str
    reason: str | None
    actor: str
    at: datetime


def study_assessments(db: Database, study_id: int) -> list[StudyAssessment]:
    """The latest verdict per image of a study (by result id), for an onward report."""
    latest: dict[int, StudyAssessment] = {}
    with db.reading() as s:
        rows = s.execute(
            select(FindingAssessment, Study.study_instance_uid, Instance.sop_instance_uid)
            .join(Result, Result.id == FindingAssessment.result_id)
            .join(Instance, Instance.id == Result.instance_id)
            .join(Study, Study.id == FindingAssessment.study_id)
            .where(FindingAssessment.study_id == study_id)
            .order_by(FindingAssessment.id)
        ).all()
        for a, study_uid, sop_uid in rows:
            latest[a.result_id] = StudyAssessment(study_uid, sop_uid, a.result_id, a.verdict, a.reason, a.actor, a.at)
    return [latest[k] for k in sorted(latest)]


# -- overdue ------------------------------------------------------------------------------------
def overdue_cutoff(overdue_days: int, now: datetime | None = None) -> datetime:
    """A patient referred at or before this moment, still waiting for DXA, is overdue."""
    return (now or utcnow()) - timedelta(days=overdue_days)


def waiting_days(referred_at: datetime | None, now: datetime | None = None) -> int | None:
    """Whole days since the referral."""
    if referred_at is None:
        return None
    return ((now or utcnow()) - referred_at).days


def is_overdue(status: str, referred_at: datetime | None, overdue_days: int, now: datetime | None = None) -> bool:
    return status == "dxa_ordered" and referred_at is not None and referred_at <= overdue_cutoff(overdue_days, now)


@dataclass(frozen=True)
class OverdueRow:
    id: int
    patient_id: str | None
    patient_name: str | None
    referred_at: datetime
    waiting_days: int


def overdue(db: Database, overdue_days: int, now: datetime | None = None) -> list[OverdueRow]:
    """Patients referred for DXA with no DXA result after ``overdue_days``, longest waiting first."""
    now = now or utcnow()
    with db.reading() as s:
        rows = s.execute(
            select(FlaggedPatient)
            .where(FlaggedPatient.status == "dxa_ordered")
            .where(FlaggedPatient.referred_at <= overdue_cutoff(overdue_days, now))
            .order_by(FlaggedPatient.referred_at, FlaggedPatient.id)
        ).scalars()
        return [
            OverdueRow(r.id, r.patient_id, r.patient_name, r.referred_at, (now - r.referred_at).days)
            for r in rows
            if r.referred_at is not None
        ]


# -- evidence -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvidenceRow:
    """The patients first flagged in one month (UTC), ``month`` "YYYY-MM" or "all"."""

    month: str
    flagged: int
    by_state: dict[str, int]
    dxa_n: int  # of those, with a DXA result (the latest "DXA done" counts)
    days_to_dxa_median: float | None  # days from first flag to the DXA's date
    low_n: int  # measured T-score <= -1.0
    osteoporosis_n: int  # measured T-score <= -2.5

    @property
    def ppv_low(self) -> float | None:
        return self.low_n / self.dxa_n if self.dxa_n else None

    @property
    def ppv_osteoporosis(self) -> float | None:
        return self.osteoporosis_n / self.dxa_n if self.dxa_n else None


EVIDENCE_COLUMNS = (
    "month",
    "flagged",
    *FOLLOW_UP_STATUSES,
    "dxa_n",
    "days_flag_to_dxa_median",
    "dxa_t_le_-1.0",
    "ppv_t_le_-1.0",
    "dxa_t_le_-2.5",
    "ppv_t_le_-2.5",
)


def _fraction(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def evidence_cells(r: EvidenceRow) -> list[object]:
    median = "" if r.days_to_dxa_median is None else f"{r.days_to_dxa_median:g}"
    return [
        r.month,
        r.flagged,
        *(r.by_state.get(st, 0) for st in FOLLOW_UP_STATUSES),
        r.dxa_n,
        median,
        r.low_n,
        _fraction(r.ppv_low),
        r.osteoporosis_n,
        _fraction(r.ppv_osteoporosis),
    ]


def _row(
    month: str, patients: list[tuple[str, datetime]], dxa: dict[int, tuple[float, date]], ids: list[int]
) -> EvidenceRow:
    states = Counter(st for st, _ in patients)
    measured = [(dxa[i], first) for i, (_, first) in zip(ids, patients, strict=True) if i in dxa]
    days = [(day - first.date()).days for (_, day), first in measured]
    return EvidenceRow(
        month,
        len(patients),
        {st: states.get(st, 0) for st in FOLLOW_UP_STATUSES},
        len(measured),
        float(statistics.median(days)) if days else None,
        sum(1 for (t, _), _ in measured if t <= OSTEOPENIA_T),
        sum(1 for (t, _), _ in measured if t <= OSTEOPOROSIS_T),
    )


def _month_range(patients: Sequence[Any]) -> list[str]:
    """Every month from the first flag's to the last one's, those without a flag included."""
    if not patients:
        return []
    firsts = [p[2] for p in patients]
    y, m = min(firsts).year, min(firsts).month
    last = (max(firsts).year, max(firsts).month)
    out = []
    while (y, m) <= last:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def evidence(db: Database) -> list[EvidenceRow]:
    """Per month of first flag, oldest first (a month without a flag has its row of zeros), then
    "all": patients per current state, time from flag to DXA (median, n) and observed PPV against
    the measured T-scores."""
    with db.reading() as s:
        patients = s.execute(
            select(FlaggedPatient.id, FlaggedPatient.status, FlaggedPatient.first_flagged_at).order_by(
                FlaggedPatient.first_flagged_at, FlaggedPatient.id
            )
        ).all()
        events = s.execute(
            select(FollowUpEvent.flagged_id, FollowUpEvent.measured_t_score, FollowUpEvent.dxa_date, FollowUpEvent.at)
            .where(FollowUpEvent.action == "dxa_done", FollowUpEvent.measured_t_score.is_not(None))
            .order_by(FollowUpEvent.id)
        ).all()
    dxa: dict[int, tuple[float, date]] = {}
    for fid, t, day, at in events:  # the latest counts; one without a date (before 0008) by its entry
        if t is not None:
            dxa[int(fid)] = (float(t), day or at.date())
    months: dict[str, list[tuple[int, str, datetime]]] = {m: [] for m in _month_range(patients)}
    for pid, status, first in patients:
        months[f"{first:%Y-%m}"].append((int(pid), str(status), first))
    out = [
        _row(m, [(st, f) for _, st, f in rows], dxa, [i for i, _, _ in rows]) for m, rows in months.items()
    ]
    out.append(_row("all", [(str(st), f) for _, st, f in patients], dxa, [int(i) for i, _, _ in patients]))
    return out
