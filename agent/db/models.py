"""SQLAlchemy 2 typed models of the audit database.

Every schema change goes through an Alembic migration in ``agent/db/migrations``.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from agent.db.types import UtcDateTime


class Base(DeclarativeBase):
    pass


class Study(Base):
    """One study as received. Holds the patient/study identifiers (PHI stays in the database)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_calling_ae: Mapped[str] = mapped_column(String(16))

    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    """One received instance and where its bytes are kept in the spool."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_uid_content"),
        Index("ix_instances_sop_instance_uid", "sop_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    laterality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    spool_path: Mapped[str] = mapped_column(String(255), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(255))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # set when this instance reuses a SOP Instance UID already received with other content
    conflict_of_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    spool_removed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # the agent that received it and holds its spool file (agent.node; NULL: the single node of old)
    node: Mapped[str | None] = mapped_column(String(64), index=True)

    study: Mapped[Study] = relationship(back_populates="instances")
    job: Mapped[Job] = relationship(back_populates="instance", uselist=False)


class Job(Base):
    """The queue entry of one instance. Every state change is one committed row update."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_not_before", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    not_before: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # leased lowest first: 0 live traffic, SWEEP_PRIORITY (agent/queue/sweeps.py) retrieved by a sweep
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the agent that leased it last (agent.node; NULL: never leased, or the single node of old)
    node: Mapped[str | None] = mapped_column(String(64), index=True)

    instance: Mapped[Instance] = relationship(back_populates="job")


class SweepStudy(Base):
    """One study a retrospective sweep found in an archive, and how far its retrieval got.

    state: pending (found, not yet retrieved), retrieving (a C-MOVE/C-GET was started: instances
    arriving now are the sweep's), done (retrieved, or already screened), failed (its retrieval
    failed; retried by the next sweep). No PHI: identifiers, date and counts only.
    """

    __tablename__ = "sweep_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    pacs: Mapped[str] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), index=True)
    series: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    send_results: Mapped[bool] = mapped_column(Boolean, default=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    found_at: Mapped[datetime] = mapped_column(UtcDateTime())
    retrieve_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), index=True)
    done_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class SweepCursor(Base):
    """Where a sweep over a date range stands: every study date before ``next_date`` is done.

    ``key``: "<pacs>:<from>:<to>" for `strnet sweep`, "<pacs>:scheduled" for the scheduled sweep.
    """

    __tablename__ = "sweep_cursors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    next_date: Mapped[str] = mapped_column(String(8))
    finished: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AtnaExport(Base):
    """Where the export of the audit trail to the hospital's audit repository (IHE ATNA) stands:
    every event with an id up to ``last_event_id`` was delivered. One row (id 1); ``attempts``,
    ``next_attempt_at`` and ``last_error`` (no PHI) hold the backoff after a failed delivery."""

    __tablename__ = "atna_export"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AuditEvent(Base):
    """Append-only, hash-chained audit trail (event codes after DICOM PS3.15 audit messages)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    event_code: Mapped[str] = mapped_column(String(16))
    event_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(1))  # C R U D E (PS3.15 EventActionCode)
    outcome: Mapped[int] = mapped_column(Integer)  # 0 success, 4 minor, 8 serious, 12 major failure
    actor: Mapped[str] = mapped_column(String(128))
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict | None] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Result(Base):
    """STR-Net's findings for one screened instance (one row per job)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    bone_loss: Mapped[bool] = mapped_column(Boolean)
    # P(osteoporosis | bone loss); the column keeps its first name
    p_osteoporosis_given_bone_loss: Mapped[float] = mapped_column("p_osteoporosis", Float)
    severity: Mapped[str | None] = mapped_column(String(16))
    t_score: Mapped[float] = mapped_column(Float)
    t_score_low: Mapped[float] = mapped_column(Float)
    t_score_high: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    overlay_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # [row0, col0, row1, col1] of the square the model assessed (Findings.region); the SR draws it
    assessed_region: Mapped[list | None] = mapped_column(JSON)
    timings_ms: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class StudyReport(Base):
    """One Structured Report revision of a study; a later one references its predecessor."""

    __tablename__ = "study_reports"
    __table_args__ = (UniqueConstraint("study_id", "revision", name="uq_study_report_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    result_count: Mapped[int] = mapped_column(Integer)
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("study_reports.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # the agent that built it (node storage: its revisions cover the images that agent holds)
    node: Mapped[str | None] = mapped_column(String(64), index=True)


class KneeResult(Base):
    """One knee of a study at an SR revision: the screened films of one side combined
    (model/knee.py), recorded with the patient's flag before the SR is built and linked to the SR
    (``report_id``) in its commit. A table, not columns of ``results``: a knee spans several
    result rows, and each revision keeps the knees it reported (a late film changes its knee; what
    PACS got for the earlier revision stays)."""

    __tablename__ = "knee_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)  # the SR revision the knee was decided for
    # NULL until that revision's SR is recorded (an SR that cannot be built leaves it NULL)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("study_reports.id"), index=True)
    laterality: Mapped[str | None] = mapped_column(String(1))  # L, R; NULL: a film of unknown side
    result_ids: Mapped[list] = mapped_column(JSON)  # the films' results.id
    n_images: Mapped[int] = mapped_column(Integer)
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    bone_loss: Mapped[bool] = mapped_column(Boolean)
    p_osteoporosis_given_bone_loss: Mapped[float] = mapped_column(Float)
    severity: Mapped[str | None] = mapped_column(String(16))
    t_score: Mapped[float] = mapped_column(Float)
    t_score_low: Mapped[float] = mapped_column(Float)
    t_score_high: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


# StudyReportFailure.state: retried after next_attempt_at, or given up (replayed by an operator)
REPORT_RETRY = "retry"
REPORT_DEAD = "dead"


class StudyReportFailure(Base):
    """Why a study's SR could not be built, and when it is tried again (one row per study).

    Gone once an SR of the study is recorded. ``last_error`` is a redacted reason (the exception
    class and a fixed text, never an element value); ``study_received_at`` is the study's last
    receipt when the failure was recorded: a later instance starts the attempts afresh.
    """

    __tablename__ = "study_report_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), unique=True)
    state: Mapped[str] = mapped_column(String(16))  # REPORT_RETRY | REPORT_DEAD
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    study_received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class OutboxItem(Base):
    """A result object waiting for (or done with) delivery to one destination."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_object_destination"),
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "sr" | "sc"
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))  # relative to data_dir/results
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_status: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # storage commitment (a destination with storage_commitment = true): the Transaction UID of
    # the N-ACTION that asked for this object, and when; its N-EVENT-REPORT is matched by it
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    commitment_asked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # 0: a live study's result; SWEEP_PRIORITY: a result of what the archive sweep retrieved (sent
    # after every live one due to the same destination; agent/queue/outbox.py lease_due)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the agent whose results folder holds the file (shared storage: the one sending it last)
    node: Mapped[str | None] = mapped_column(String(64), index=True)


class FlaggedPatient(Base):
    """One row per screened-positive patient (not per study); keeps the latest figures."""

    __tablename__ = "patients_flagged"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_key: Mapped[str] = mapped_column(String(80), unique=True)  # PatientID, else study:<uid>
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    first_flagged_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_flagged_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    last_study_date: Mapped[str | None] = mapped_column(String(8))
    probability: Mapped[float] = mapped_column(Float)
    severity: Mapped[str | None] = mapped_column(String(16))
    t_score: Mapped[float] = mapped_column(Float)
    # the knee the figures are of (L, R; NULL with knee_images set: a film of unknown side) and
    # its screened films; both NULL: an image's figures (rows flagged before migration 0012_knee)
    knee_laterality: Mapped[str | None] = mapped_column(String(1))
    knee_images: Mapped[int | None] = mapped_column(Integer)
    # FLS pathway: when the patient was referred for DXA (the overdue clock); cleared on reopening
    referred_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), index=True)


class FollowUpEvent(Base):
    """A coordinator's step on a flagged patient (DXA referred/done, treatment, closed; agent/db/fls.py)."""

    __tablename__ = "follow_up_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    flagged_id: Mapped[int] = mapped_column(ForeignKey("patients_flagged.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    measured_t_score: Mapped[float | None] = mapped_column(Float)
    dxa_date: Mapped[date | None] = mapped_column(Date)  # "DXA done": the day the scan was done


class FindingAssessment(Base):
    """A radiologist's verdict on one screened image result (IHE AI Results Assessment): who,
    when, agree or disagree, and why. Rows are only added; the latest per result counts."""

    __tablename__ = "finding_assessments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    flagged_id: Mapped[int] = mapped_column(ForeignKey("patients_flagged.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    verdict: Mapped[str] = mapped_column(String(16))  # "agree" | "disagree"
    reason: Mapped[str | None] = mapped_column(Text)


class User(Base):
    """A person who may use the admin web (argon2 password hash; role viewer, admin, auditor or radiologist)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class WebSession(Base):
    """A server-side admin-web session; the cookie holds a random token, this row its SHA-256."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Node(Base):
    """An agent sharing this database (agent.node), and when it last wrote its heartbeat."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    storage: Mapped[str] = mapped_column(String(16))  # agent.storage: node | shared
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime())


class StudyClaim(Base):
    """The one agent building a study's SR now; another may take it over once it expired."""

    __tablename__ = "study_claims"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), unique=True)
    node: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class OpenAssociation(Base):
    """A study that an association still open on an agent has carried: its SR waits (any agent)."""

    __tablename__ = "open_associations"
    __table_args__ = (
        UniqueConstraint("node", "association", "study_instance_uid", name="uq_open_association_study"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    association: Mapped[str] = mapped_column(String(32))  # the association's key on that agent
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime())
