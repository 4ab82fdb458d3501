"""Read models and the flagged-patient registry over the audit database.

The CLI and the web read through here; the worker calls ``upsert_flag`` inside its transaction.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import FindingAssessment, FlaggedPatient, FollowUpEvent, Instance, KneeResult, Result, Study
from agent.db.upsert import insert_if_absent

# the fracture-liaison pathway (agent/db/fls.py has its transitions and labels)
FOLLOW_UP_STATUSES = (
    "new",
    "confirmed",
    "rejected",
    "dxa_ordered",
    "dxa_done",
    "treatment",
    "no_treatment",
    "closed",
)
IN_FOLLOW_UP = ("confirmed", "dxa_ordered", "dxa_done", "treatment", "no_treatment")


def patient_key(study: Study) -> str:
    return study.patient_id or f"study:{study.study_instance_uid}"


def _outranks(new_date: str | None, new_p: float, old_date: str | None, old_p: float) -> bool:
    """Whether a positive of one study should show rather than that of another: the later StudyDate
    (a study without a date, or compared with one without, counts as the latest arrival); of two
    studies of one day (a bilateral exam under two accessions), the more suspicious."""
    new, old = new_date or "", old_date or ""
    if len(new) == 8 and len(old) == 8 and new.isdigit() and old.isdigit():
        return new > old or (new == old and new_p > old_p)
    return True


def _supersedes(study: Study, result: Result | KneeResult, row: FlaggedPatient) -> bool:
    """Whether ``result`` (a positive knee, or image, of ``study``) should give the row its figures.

    The row shows the patient's latest positive study (``_outranks``) and, within that study, its
    knee with the highest probability, as the SR's study summary does (the knee decision passes
    only that knee; a later revision's knee replaces an earlier revision's). An older study that
    arrives later, or a less suspicious image of the same study, is counted and audited but leaves
    the figures alone.
    """
    if row.last_study_id == study.id:
        if isinstance(result, KneeResult):
            return True  # the study's latest SR revision decides
        return result.probability > row.probability
    return _outranks(study.study_date, result.probability, row.last_study_date, row.probability)


def _show(row: FlaggedPatient, study: Study, result: Result | KneeResult) -> None:
    """Give the row the patient's details and figures of ``study`` and its knee (or image)."""
    row.patient_id = study.patient_id
    row.patient_name = study.patient_name
    row.patient_birth_date = study.patient_birth_date
    row.patient_sex = study.patient_sex
    row.last_study_id = study.id
    row.last_study_date = study.study_date
    row.probability = result.probability
    row.severity = result.severity
    row.t_score = result.t_score
    row.knee_laterality = result.laterality if isinstance(result, KneeResult) else None
    row.knee_images = result.n_images if isinstance(result, KneeResult) else None


def _locked_row(session: Session, key: str) -> FlaggedPatient | None:
    return session.execute(
        select(FlaggedPatient)
        .where(FlaggedPatient.patient_key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def upsert_flag(session: Session, study: Study, result: Result | KneeResult) -> FlaggedPatient:
    """Flag the study's patient, or update their row; one row per patient, every change audited.

    The agent flags when a study is quiet, before its SR is built, with the study's positive knee
    of the highest probability (``screening.record_knees``); a ``Result`` (an image's figures) is what rows of
    before carry. ``last_flagged_at`` is when the agent last flagged the patient (what the lists
    sort and filter on); probability, severity, T-score, knee and last study are those of
    ``_supersedes``."""
    knee = isinstance(result, KneeResult)
    now = utcnow()
    key = patient_key(study)
    # another process may be flagging the same patient right now: insert unless there, then read
    # the row locked (FOR UPDATE on PostgreSQL) so the two updates follow each other
    # (twice: a flag withdrawn by another process between the two statements is inserted afresh)
    row = None
    for _ in range(2):
        inserted = insert_if_absent(
            session,
            FlaggedPatient,
            {
                "patient_key": key,
                "status": "new",
                "first_flagged_at": now,
                "last_flagged_at": now,
                "last_study_id": study.id,
                "probability": result.probability,
                "t_score": result.t_score,
            },
            ["patient_key"],
        )
        if (row := _locked_row(session, key)) is not None:
            break
    assert row is not None
    if inserted:
        change = "flagged"
    elif _supersedes(study, result, row):
        change = "updated"
        if row.status == "closed":  # a newer (or more suspicious) positive film is worth a new look
            row.status = "new"
            row.referred_at = None
            change = "reopened"
    else:
        change = "counted"  # an older study, or a less suspicious image of the same one
    row.last_flagged_at = now
    if change != "counted":
        _show(row, study, result)
    session.flush()
    detail = {"change": change, "study_id": study.id, ("knee_result_id" if knee else "result_id"): result.id}
    _audit(session, row, "C" if change == "flagged" else "U", detail)
    return row


def _audit(session: Session, row: FlaggedPatient, action: str, detail: dict[str, Any]) -> None:
    """The worker's change to a flagged patient in the audit trail, with the row's status."""
    trail.append(session, "patient_record", actor="strnet-worker", action=action, object_type="flagged_patient",
                 object_id=str(row.id), detail={**detail, "status": row.status})  # fmt: skip


def revise_flag(session: Session, study: Study, knee: KneeResult) -> None:
    """A revision of ``study`` in which no knee is positive (``knee``: its most probable), as when a
    retake brings a knee's combined probability below the threshold. A flag that rested on this
    study no longer does: its figures move to the patient's latest other positive study; with none,
    a patient nobody has acted on (still *new*, no follow-up step, no radiologist's verdict) leaves
    the list, and one already worked on keeps its status and shows this revision's figures. A flag
    that rests on another study is left alone. Every change audited."""
    row = _locked_row(session, patient_key(study))
    if row is None or row.last_study_id != study.id:
        return
    other = _latest_other_positive(session, study)
    if other is not None:
        change, shown = "revised", other
        _show(row, *other)
    elif row.status == "new" and not _acted_on(session, row.id):
        change, shown = "withdrawn", (study, knee)
    else:
        change, shown = "revised_negative", (study, knee)
        _show(row, study, knee)
    detail = {"change": change, "study_id": shown[0].id, "knee_result_id": shown[1].id, "revised_study_id": study.id}
    _audit(session, row, "D" if change == "withdrawn" else "U", detail)
    if change == "withdrawn":
        session.delete(row)
    session.flush()


def _latest_other_positive(session: Session, study: Study) -> tuple[Study, KneeResult] | None:
    """The patient's other study whose latest revision has a positive knee, as ``_outranks``
    orders them, with its most probable positive knee; None without a PatientID or such a study."""
    if not study.patient_id:
        return None
    latest = (
        select(KneeResult.study_id, func.max(KneeResult.revision).label("revision"))
        .join(Study, Study.id == KneeResult.study_id)
        .where(Study.patient_id == study.patient_id, Study.id != study.id)
        .group_by(KneeResult.study_id)
        .subquery()
    )
    candidates = session.execute(
        select(Study, KneeResult)
        .join(KneeResult, KneeResult.study_id == Study.id)
        .join(latest, (latest.c.study_id == KneeResult.study_id) & (latest.c.revision == KneeResult.revision))
        .where(KneeResult.bone_loss.is_(True))
        .order_by(Study.id, KneeResult.probability.desc(), KneeResult.id)
    ).all()
    best: tuple[Study, KneeResult] | None = None
    for s, k in candidates:  # in order of arrival, each study's most probable knee first
        if best is None or (
            s.id != best[0].id and _outranks(s.study_date, k.probability, best[0].study_date, best[1].probability)
        ):
            best = (s, k)
    return best


def _acted_on(session: Session, flagged_id: int) -> bool:
    """Whether a coordinator recorded a step or a radiologist a verdict on this flagged patient."""
    step = session.execute(select(FollowUpEvent.id).where(FollowUpEvent.flagged_id == flagged_id).limit(1)).first()
    verdict = session.execute(
        select(FindingAssessment.id).where(FindingAssessment.flagged_id == flagged_id).limit(1)
    ).first()
    return step is not None or verdict is not None

# What a spreadsheet may read as the start of a formula: = + - @, and their full-width forms
_FORMULA_STARTS = frozenset("=+-@\uff1d\uff0b\uff0d\uff20")
# a plain number (T-score -2.1, +1.5e-3): a spreadsheet reads it as a number, never a formula
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _skipped_before_formula(ch: str) -> bool:
    """Characters a spreadsheet may pass over before it sees ``=``: any Unicode whitespace
    (space, NBSP, ideographic space ...), control and format characters (zero-width space, BOM)."""
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf")


def spreadsheet_cell(v: object) -> object:
    """A CSV export's cell: text that a spreadsheet would run as a formula (a patient name such
    as ``=HYPERLINK(...)`` arrives from any modality) is quoted with a leading apostrophe.

    That is text starting with a tab or CR, or whose first character that is not whitespace (a
    space, NBSP or any other Unicode space) nor an invisible format character is = + - @ (or a
    full-width one). A plain number, such as a T-score of -2.1 as text, stays as it is; numbers
    (int, float) are never text."""
    if not isinstance(v, str) or not v:
        return v
    if v[0] in ("\t", "\r"):
        return "'" + v
    i = 0
    while i < len(v) and _skipped_before_formula(v[i]):
        i += 1
    if v[i : i + 1] in _FORMULA_STARTS and not _PLAIN_NUMBER.fullmatch(v[i:].strip()):
        return "'" + v
    return v


@dataclass(frozen=True)
class FlaggedRow:
    """One flagged patient as the web and the CLI show it."""

    id: int
    patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    status: str
    first_flagged_at: datetime
    last_flagged_at: datetime
    last_study_date: str | None
    probability: float
    severity: str | None
    t_score: float
    referred_at: datetime | None
    knee_laterality: str | None  # the knee the figures are of: L, R, None (unknown side)
    knee_images: int | None  # its screened films; None: an image's figures (flagged before knees)

    @classmethod
    def of(cls, r: FlaggedPatient, **more: Any) -> Self:
        """The row's fields, plus ``more`` for a subclass's own."""
        return cls(
            r.id, r.patient_id, r.patient_name, r.patient_birth_date, r.patient_sex, r.status,
            r.first_flagged_at, r.last_flagged_at, r.last_study_date, r.probability, r.severity, r.t_score,
            r.referred_at, r.knee_laterality, r.knee_images, **more,
        )

    @property
    def knee(self) -> str:
        """Which knee the figures are of, in words: "Left knee, 2 images"; "" for an image's."""
        if self.knee_images is None:
            return ""
        side = {"L": "Left knee", "R": "Right knee"}.get(self.knee_laterality or "", "Knee")
        return f"{side}, {self.knee_images} image{'s' if self.knee_images != 1 else ''}"


@dataclass(frozen=True)
class FlaggedView(FlaggedRow):
    """A flagged patient with the number of positive studies (the CLI and the digest)."""

    studies: int


def list_flagged(db: Database, status: str | None = None, since: datetime | None = None) -> list[FlaggedView]:
    with db.reading() as s:
        q = select(FlaggedPatient).order_by(FlaggedPatient.last_flagged_at.desc(), FlaggedPatient.id)
        if status:
            q = q.where(FlaggedPatient.status == status)
        if since:
            q = q.where(FlaggedPatient.last_flagged_at >= since)
        rows = list(s.execute(q).scalars())
        out = []
        for r in rows:
            n = s.execute(
                select(func.count(func.distinct(Result.study_id)))
                .join(Study, Study.id == Result.study_id)
                .where(Result.bone_loss.is_(True))
                .where((Study.patient_id == r.patient_id) if r.patient_id else (Study.id == r.last_study_id))
            ).scalar_one()
            out.append(FlaggedView.of(r, studies=int(n)))
        return out


@dataclass(frozen=True)
class StudyResultView:
    study_instance_uid: str
    sop_instance_uid: str
    laterality: str | None
    probability: float
    bone_loss: bool
    severity: str | None
    t_score: float
    t_score_low: float
    t_score_high: float


def study_results(db: Database, study_instance_uid: str) -> list[StudyResultView]:
    with db.reading() as s:
        rows = s.execute(
            select(Result, Instance, Study.study_instance_uid)
            .join(Instance, Instance.id == Result.instance_id)
            .join(Study, Study.id == Result.study_id)
            .where(Study.study_instance_uid == study_instance_uid)
            .order_by(Result.id)
        ).all()
        return [
            StudyResultView(
                uid,
                i.sop_instance_uid,
                i.laterality,
                r.probability,
                r.bone_loss,
                r.severity,
                r.t_score,
                r.t_score_low,
                r.t_score_high,
            )
            for r, i, uid in rows
        ]
