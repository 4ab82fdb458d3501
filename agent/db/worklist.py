"""What the admin web reads and writes: the flagged worklist, patient detail, follow-up,
observed performance, dead letters, status and the audit log.

The web reads through here, never through SQLAlchemy itself. Identifiers handed to the web are
row ids, never patient or DICOM identifiers.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.exc import DatabaseError

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import (
    REPORT_DEAD,
    REPORT_RETRY,
    AuditEvent,
    FlaggedPatient,
    FollowUpEvent,
    Instance,
    Job,
    OutboxItem,
    Result,
    Study,
    StudyReportFailure,
)
from agent.db.registry import FOLLOW_UP_STATUSES, FlaggedRow
from agent.dicom_values import parse_da
from agent.domain import JobState, OutboxState
from agent.logging import hash_uid

SEVERITIES = ("osteopenia", "osteoporosis")
SORTS = {
    "flagged": FlaggedPatient.last_flagged_at,
    "probability": FlaggedPatient.probability,
    "t_score": FlaggedPatient.t_score,
    "status": FlaggedPatient.status,
    "name": FlaggedPatient.patient_name,
    "study_date": FlaggedPatient.last_study_date,
    "referred": FlaggedPatient.referred_at,
}
OSTEOPENIA_T = -1.0  # WHO: a measured T-score at or below -1.0 is low bone mass

# Probabilities are shown with three decimals, rounded down (0.996 is 0.996, 0.9996 is 0.999: never
# 1.000 unless it is 1), and the worklist's minimum compares with that shown value.
PROBABILITY_STEP = Decimal("0.001")


def shown_probability(p: float) -> str:
    """A probability as the web shows it: three decimals, rounded down.

    ``repr`` gives the shortest decimal that is this float, so 0.5378 is 0.537, not 0.5379999...
    floored to 0.537 by accident of binary, nor 0.538 by rounding half up."""
    return str(Decimal(repr(float(p))).quantize(PROBABILITY_STEP, rounding=ROUND_FLOOR))


def probability_bound(minimum: float) -> float:
    """What ``probability >= bound`` must compare with so that a row passes exactly when its
    shown probability (:func:`shown_probability`) is at least ``minimum``: the minimum rounded up
    to the shown step (0.54 stays 0.54; 0.5375 becomes 0.538, as 0.5378 is shown 0.537)."""
    return float(Decimal(repr(float(minimum))).quantize(PROBABILITY_STEP, rounding=ROUND_CEILING))


def shown_number(v: object, decimals: int = 4) -> str:
    """A number for people (thresholds, settings): at most ``decimals`` decimals, no trailing zeros
    (0.41234567890123456 is 0.4123, 0.5 is 0.5); anything else as text."""
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or not math.isfinite(v):
        return str(v)
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def record_access(
    db: Database,
    kind: str,
    *,
    actor: str,
    action: str = "R",
    object_type: str | None = None,
    object_id: str | None = None,
    detail: dict[str, Any] | None = None,
    outcome: int = 0,
) -> None:
    """One audit event in its own transaction (views, exports, refusals)."""
    with db.transaction() as s:
        trail.append(
            s,
            kind,
            actor=actor,
            action=action,
            outcome=outcome,
            object_type=object_type,
            object_id=object_id,
            detail=detail,
        )


# -- flagged worklist ----------------------------------------------------------------------
# the dates a filter may name: the queries add a day to the last one (date.max would overflow)
FILTER_DATE_MIN, FILTER_DATE_MAX = date(1900, 1, 1), date(2200, 12, 31)


def filter_date(text: str) -> date:
    """A filter's date from YYYY-MM-DD; ValueError if it is not one or lies outside the years
    1900..2200 (a date picker offers 9999-12-31)."""
    day = date.fromisoformat(text)
    if not FILTER_DATE_MIN <= day <= FILTER_DATE_MAX:
        raise ValueError(f"a date between {FILTER_DATE_MIN} and {FILTER_DATE_MAX}")
    return day


@dataclass(frozen=True)
class FlaggedFilter:
    status: str | None = None
    severity: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    min_probability: float | None = None
    overdue_before: datetime | None = None  # only patients referred for DXA at or before this, still waiting
    sort: str = "flagged"
    descending: bool = True
    page: int = 1
    per_page: int = 25

    def as_detail(self) -> dict[str, Any]:
        """The filter as an audit detail (holds no PHI)."""
        return {
            "status": self.status,
            "severity": self.severity,
            "date_from": self.date_from.isoformat() if self.date_from else None,
            "date_to": self.date_to.isoformat() if self.date_to else None,
            "min_probability": self.min_probability,
            "overdue": self.overdue_before is not None,
            "sort": self.sort,
            "descending": self.descending,
        }


def _filtered(f: FlaggedFilter) -> Select[Any]:
    q = select(FlaggedPatient)
    if f.status:
        q = q.where(FlaggedPatient.status == f.status)
    if f.severity:
        q = q.where(FlaggedPatient.severity == f.severity)
    if f.date_from:
        q = q.where(FlaggedPatient.last_flagged_at >= datetime.combine(f.date_from, time.min))
    if f.date_to:
        q = q.where(FlaggedPatient.last_flagged_at < datetime.combine(f.date_to + timedelta(days=1), time.min))
    if f.min_probability is not None:  # compared as shown: see probability_bound
        q = q.where(FlaggedPatient.probability >= probability_bound(f.min_probability))
    if f.overdue_before is not None:
        q = q.where(FlaggedPatient.status == "dxa_ordered", FlaggedPatient.referred_at <= f.overdue_before)
    return q


_MAX_OFFSET = 2**63 - 1  # a 64-bit signed integer: SQLite's INTEGER and PostgreSQL's BIGINT
# the largest row id: the id columns are Integer, PostgreSQL's 32-bit INTEGER (SQLite's would hold
# 64 bits); a larger id names no row, and PostgreSQL refuses to compare it (a DataError)
MAX_ROW_ID = 2**31 - 1


def _offset(page: int, per_page: int) -> int:
    """The row offset of ``page``; OverflowError (the web's 404) past what either engine can take,
    on both engines alike (SQLite's driver raises it, PostgreSQL would answer a DataError)."""
    offset = (max(1, page) - 1) * per_page
    if offset > _MAX_OFFSET:
        raise OverflowError("page beyond the database's integer range")
    return offset


def flagged_page(db: Database, f: FlaggedFilter, paginate: bool = True) -> tuple[list[FlaggedRow], int]:
    """The rows of one page (or all rows) and the total count matching the filter."""
    col = SORTS.get(f.sort, SORTS["flagged"])
    with db.reading() as s:
        base = _filtered(f)
        total = int(s.execute(select(func.count()).select_from(base.subquery())).scalar_one())
        key = col.desc() if f.descending else col.asc()
        if f.sort == "referred":  # never referred: last, whichever the direction
            key = key.nulls_last()
        q = base.order_by(key, FlaggedPatient.id)
        if paginate:
            q = q.limit(f.per_page).offset(_offset(f.page, f.per_page))
        return [FlaggedRow.of(r) for r in s.execute(q).scalars()], total


# -- patient detail ------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageResult:
    id: int
    laterality: str | None
    view_position: str | None
    probability: float
    threshold: float
    bone_loss: bool
    severity: str | None
    t_score: float
    t_score_low: float
    t_score_high: float
    model_version: str
    has_overlay: bool


@dataclass(frozen=True)
class StudyBlock:
    id: int
    study_date: str | None
    accession_number: str | None
    received_at: datetime
    results: list[ImageResult]


@dataclass(frozen=True)
class FollowUp:
    at: datetime
    actor: str
    action: str
    note: str | None
    measured_t_score: float | None
    dxa_date: date | None = None


@dataclass(frozen=True)
class PatientDetail:
    patient: FlaggedRow
    studies: list[StudyBlock]
    follow_ups: list[FollowUp] = field(default_factory=list)


def _patient_studies(s: Any, fp: FlaggedPatient) -> list[Study]:
    q = select(Study).order_by(Study.study_date, Study.first_received_at, Study.id)
    q = q.where(Study.patient_id == fp.patient_id) if fp.patient_id else q.where(Study.id == fp.last_study_id)
    return list(s.execute(q).scalars())


def patient_detail(db: Database, flagged_id: int) -> PatientDetail | None:
    with db.reading() as s:
        fp = s.get(FlaggedPatient, flagged_id)
        if fp is None:
            return None
        blocks = []
        for st in _patient_studies(s, fp):
            rows = s.execute(
                select(Result, Instance)
                .join(Instance, Instance.id == Result.instance_id)
                .where(Result.study_id == st.id)
                .order_by(Result.id)
            ).all()
            results = [
                ImageResult(
                    r.id,
                    i.laterality,
                    i.view_position,
                    r.probability,
                    r.threshold,
                    r.bone_loss,
                    r.severity,
                    r.t_score,
                    r.t_score_low,
                    r.t_score_high,
                    r.model_version,
                    r.overlay_sop_instance_uid is not None,
                )
                for r, i in rows
            ]
            blocks.append(StudyBlock(st.id, st.study_date, st.accession_number, st.first_received_at, results))
        events = [
            FollowUp(e.at, e.actor, e.action, e.note, e.measured_t_score, e.dxa_date)
            for e in s.execute(
                select(FollowUpEvent).where(FollowUpEvent.flagged_id == fp.id).order_by(FollowUpEvent.id)
            ).scalars()
        ]
        return PatientDetail(FlaggedRow.of(fp), blocks, events)


@dataclass(frozen=True)
class TrendPoint:
    label: str  # study date (YYYY-MM-DD) or receipt date
    probability: float  # the highest image probability of the study
    t_score: float  # the lowest image T-score of the study
    threshold: float  # the operating threshold the study was screened at


def trend(db: Database, flagged_id: int) -> list[TrendPoint]:
    detail = patient_detail(db, flagged_id)
    if detail is None:
        return []
    out = []
    for st in detail.studies:
        if not st.results:
            continue
        study_day = parse_da(st.study_date or "")
        label = (study_day or st.received_at.date()).isoformat()
        out.append(
            TrendPoint(
                label,
                max(r.probability for r in st.results),
                min(r.t_score for r in st.results),
                st.results[-1].threshold,
            )
        )
    return out


def overlay_of_result(db: Database, result_id: int) -> tuple[str, int | None] | None:
    """(path under the results folder, flagged patient id) of a result's overlay, or None."""
    with db.reading() as s:
        r = s.get(Result, result_id)
        if r is None or r.overlay_sop_instance_uid is None:
            return None
        path = s.execute(
            select(OutboxItem.path).where(OutboxItem.sop_instance_uid == r.overlay_sop_instance_uid).limit(1)
        ).scalar()
        if path is None:
            return None
        st = s.get(Study, r.study_id)
        fp_id = None
        if st is not None:
            key = st.patient_id or f"study:{st.study_instance_uid}"
            fp_id = s.execute(select(FlaggedPatient.id).where(FlaggedPatient.patient_key == key)).scalar()
        return str(path), fp_id


# -- observed performance ------------------------------------------------------------------
@dataclass(frozen=True)
class Performance:
    n: int  # patients with a measured DXA T-score
    low_measured: int  # of those, measured T <= -1.0
    ppv: float | None
    mae: float | None
    pearson_r: float | None
    pairs: list[tuple[float, float]]  # (predicted, measured)


def performance(db: Database) -> Performance:
    """PPV of the flag and predicted-vs-measured agreement over patients with a DXA result.

    Each patient counts once, with the latest measured T-score and the predicted T-score of the
    flag (the registry's current figure).
    """
    with db.reading() as s:
        rows = s.execute(
            select(FollowUpEvent.flagged_id, FollowUpEvent.measured_t_score, FlaggedPatient.t_score)
            .join(FlaggedPatient, FlaggedPatient.id == FollowUpEvent.flagged_id)
            .where(FollowUpEvent.measured_t_score.is_not(None))
            .order_by(FollowUpEvent.id)
        ).all()
    latest: dict[int, tuple[float, float]] = {}
    for fid, measured, predicted in rows:
        if measured is not None:
            latest[fid] = (float(predicted), float(measured))
    pairs = list(latest.values())
    n = len(pairs)
    low = sum(1 for _, m in pairs if m <= OSTEOPENIA_T)
    if n == 0:
        return Performance(0, 0, None, None, None, [])
    mae = sum(abs(p - m) for p, m in pairs) / n
    r = None
    if n >= 2:
        try:
            r = statistics.correlation([p for p, _ in pairs], [m for _, m in pairs])
        except statistics.StatisticsError:  # either side constant: no r
            r = None
    return Performance(n, low, low / n, mae, r, pairs)


# -- dead letters --------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadLetter:
    id: int
    kind: str
    destination: str
    study_id: int
    attempts: int
    last_status: str | None
    last_error: str | None
    updated_at: datetime


def dead_letters(db: Database, page: int = 1, per_page: int = 25) -> tuple[list[DeadLetter], int, int]:
    """One page of dead letters (oldest first), their total, and the page shown: a page past the
    end shows the last one (after a replay the list is shorter)."""
    dead = OutboxItem.state == OutboxState.DEAD.value
    with db.reading() as s:
        total = int(s.execute(select(func.count()).select_from(OutboxItem).where(dead)).scalar_one())
        page = min(max(1, page), max(1, -(-total // per_page)))
        rows = s.execute(
            select(OutboxItem).where(dead).order_by(OutboxItem.id).limit(per_page).offset((page - 1) * per_page)
        ).scalars()
        return (
            [
                DeadLetter(
                    o.id, o.kind, o.destination, o.study_id, o.attempts, o.last_status, o.last_error, o.updated_at
                )
                for o in rows
            ],
            total,
            page,
        )


def dead_letter_study(db: Database, item_id: int) -> int | None:
    with db.reading() as s:
        o = s.get(OutboxItem, item_id)
        return o.study_id if o is not None and o.state == OutboxState.DEAD.value else None


def dead_letter_studies(db: Database, item_ids: list[int]) -> dict[int, int]:
    """{item id: study row id} of those items that are still dead letters, by item id."""
    if not item_ids:
        return {}
    with db.reading() as s:
        rows = s.execute(
            select(OutboxItem.id, OutboxItem.study_id)
            .where(OutboxItem.id.in_(item_ids), OutboxItem.state == OutboxState.DEAD.value)
            .order_by(OutboxItem.id)
        ).all()
        return {int(i): int(st) for i, st in rows}


# -- status and audit log ------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorLine:
    what: str  # "job" | "outbox"
    id: int
    state: str
    at: datetime
    message: str | None


@dataclass(frozen=True)
class ReportFailureLine:
    """A study whose SR could not be built: ids and the redacted reason, no patient data."""

    id: int  # the failure's row
    study_id: int  # the study's row
    study: str | None  # the study UID hashed as the log's report_failed events show it
    state: str  # "retry" | "dead"
    attempts: int
    at: datetime  # the last failure
    next_attempt_at: datetime | None
    reason: str | None


@dataclass(frozen=True)
class StatusSummary:
    screened_last_hour: int
    screened_last_day: int
    received_last_hour: int
    received_last_day: int
    recent_errors: list[ErrorLine]
    model_version: str | None
    threshold: float | None
    flagged_by_status: dict[str, int]
    reports_dead: int = 0  # studies whose SR was given up (`strnet jobs retry --dead` replays them)
    reports_retrying: int = 0  # studies whose SR failed and waits for its next attempt
    report_failures: list[ReportFailureLine] = field(default_factory=list)  # the latest failing


def _report_failures(s: Any, limit: int) -> tuple[int, int, list[ReportFailureLine]]:
    """(given up, waiting for a retry, the latest ``limit`` failing studies)."""
    by_state = dict(s.execute(select(StudyReportFailure.state, func.count()).group_by(StudyReportFailure.state)).all())
    rows = s.execute(
        select(StudyReportFailure, Study.study_instance_uid)
        .join(Study, Study.id == StudyReportFailure.study_id)
        .order_by(StudyReportFailure.updated_at.desc(), StudyReportFailure.id.desc())
        .limit(limit)
    ).all()
    lines = [
        ReportFailureLine(
            f.id, f.study_id, hash_uid(uid), f.state, f.attempts, f.updated_at, f.next_attempt_at, f.last_error
        )
        for f, uid in rows
    ]
    return int(by_state.get(REPORT_DEAD, 0)), int(by_state.get(REPORT_RETRY, 0)), lines


def status_summary(db: Database, limit: int = 20, report_failures: int = 5) -> StatusSummary:
    now = utcnow()
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    with db.reading() as s:

        def count(q: Any) -> int:
            return int(s.execute(q).scalar_one())

        screened_h = count(select(func.count()).select_from(Result).where(Result.created_at >= hour))
        screened_d = count(select(func.count()).select_from(Result).where(Result.created_at >= day))
        recv_h = count(select(func.count()).select_from(Instance).where(Instance.received_at >= hour))
        recv_d = count(select(func.count()).select_from(Instance).where(Instance.received_at >= day))
        errors = [
            ErrorLine("job", j.id, j.state, j.updated_at, j.reason)
            for j in s.execute(
                select(Job)
                .where(Job.state.in_([JobState.FAILED.value, JobState.DEAD.value]))
                .order_by(Job.updated_at.desc())
                .limit(limit)
            ).scalars()
        ]
        errors += [
            ErrorLine("outbox", o.id, o.state, o.updated_at, o.last_error or o.last_status)
            for o in s.execute(
                select(OutboxItem)
                .where(OutboxItem.state == OutboxState.DEAD.value)
                .order_by(OutboxItem.updated_at.desc())
                .limit(limit)
            ).scalars()
        ]
        errors.sort(key=lambda e: e.at, reverse=True)
        last = s.execute(select(Result.model_version, Result.threshold).order_by(Result.id.desc()).limit(1)).first()
        by_status = dict(s.execute(select(FlaggedPatient.status, func.count()).group_by(FlaggedPatient.status)).all())
        reports_dead, reports_retrying, failing = _report_failures(s, report_failures)
    return StatusSummary(
        screened_h,
        screened_d,
        recv_h,
        recv_d,
        errors[:limit],
        last[0] if last else None,
        float(last[1]) if last else None,
        {st: int(by_status.get(st, 0)) for st in FOLLOW_UP_STATUSES},
        reports_dead=reports_dead,
        reports_retrying=reports_retrying,
        report_failures=failing,
    )


def flagged_count(db: Database) -> int:
    with db.reading() as s:
        return int(s.execute(select(func.count()).select_from(FlaggedPatient)).scalar_one())


def verify_chain(db: Database) -> trail.ChainReport:
    with db.reading() as s:
        return trail.verify(s)


# PS3.15 EventActionCode and EventOutcomeIndicator, as the audit log names them
AUDIT_ACTIONS = {"C": "Create", "R": "Read", "U": "Update", "D": "Delete", "E": "Execute"}
AUDIT_OUTCOMES = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
_EVENT_NAMES = {code: name for code, name in trail.EVENTS.values()}


@dataclass(frozen=True)
class AuditLine:
    id: int
    at: datetime
    event_code: str
    event_name: str
    action: str
    outcome: int
    actor: str
    object_type: str | None
    object_id: str | None
    detail: dict[str, Any] | None

    @property
    def event_label(self) -> str:
        """The PS3.15 name of the event code (the stored name for a code the trail no longer emits)."""
        return _EVENT_NAMES.get(self.event_code, self.event_name)

    @property
    def action_name(self) -> str:
        return AUDIT_ACTIONS.get(self.action, "")

    @property
    def outcome_name(self) -> str:
        return AUDIT_OUTCOMES.get(self.outcome, "")

    @property
    def detail_text(self) -> str:
        """The detail as JSON people can read: Unicode as it is (the page escapes it for HTML)."""
        if not self.detail:
            return ""
        return json.dumps(self.detail, ensure_ascii=False, sort_keys=True, default=str)


@dataclass(frozen=True)
class AuditFilter:
    kind: str | None = None  # a short name of trail.EVENTS
    actor: str | None = None  # exact
    date_from: date | None = None  # UTC, inclusive
    date_to: date | None = None  # UTC, inclusive

    def as_detail(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "actor": self.actor,
            "date_from": self.date_from.isoformat() if self.date_from else None,
            "date_to": self.date_to.isoformat() if self.date_to else None,
        }


def audit_page(
    db: Database, f: AuditFilter | None = None, page: int = 1, per_page: int = 50
) -> tuple[list[AuditLine], int]:
    """One page of the audit events matching ``f``, newest first, and their total."""
    f = f or AuditFilter()
    q = select(AuditEvent)
    if f.kind:
        q = q.where(AuditEvent.event_code == trail.EVENTS[f.kind][0])
    if f.actor:
        q = q.where(AuditEvent.actor == f.actor)
    if f.date_from:
        q = q.where(AuditEvent.at >= datetime.combine(f.date_from, time.min))
    if f.date_to:
        q = q.where(AuditEvent.at < datetime.combine(f.date_to + timedelta(days=1), time.min))
    with db.reading() as s:
        total = int(s.execute(select(func.count()).select_from(q.subquery())).scalar_one())
        rows = s.execute(
            q.order_by(AuditEvent.id.desc()).limit(per_page).offset(_offset(page, per_page))
        ).scalars()
        return [
            AuditLine(
                e.id,
                e.at,
                e.event_code,
                e.event_name,
                e.action,
                e.outcome,
                e.actor,
                e.object_type,
                e.object_id,
                e.detail,
            )
            for e in rows
        ], total


def ping(db: Database) -> bool:
    """Whether the database answers; False for a file that is no database (a database that cannot
    be reached raises StorageError)."""
    try:
        with db.reading() as s:
            return s.execute(select(1)).scalar() == 1
    except DatabaseError:
        return False
