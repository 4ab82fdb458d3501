"""Plain value types shared across the agent. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class JobState(enum.StrEnum):
    """Lifecycle of one received instance (docs/architecture.md, Data flow)."""

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"
    DEAD = "DEAD"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.SKIPPED, JobState.DEAD)


class OutboxState(enum.StrEnum):
    """Delivery state of one result object for one destination (agent/queue/outbox.py)."""

    PENDING = "PENDING"
    SENDING = "SENDING"
    DELIVERED = "DELIVERED"  # stored (C-STORE success) where no storage commitment is asked
    SENT = "SENT"  # stored; the destination's storage commitment is asked or about to be (still to do)
    COMMITTED = "COMMITTED"  # the destination committed to keeping it (N-EVENT-REPORT)
    RETRY = "RETRY"
    DEAD = "DEAD"
    SHADOW = "SHADOW"
    DISCARDED = "DISCARDED"  # a dead letter given up by an admin, with the reason in last_error


# still to be delivered: what the status page and /metrics count as the outbox backlog (SENT
# waits for its storage commitment)
OUTBOX_BACKLOG = (OutboxState.PENDING, OutboxState.SENDING, OutboxState.SENT, OutboxState.RETRY)


@dataclass(frozen=True)
class InstanceRef:
    """Identifiers of one stored instance; never carries PHI."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Eligibility:
    """Outcome of the eligibility rules: ``reason`` is set when not eligible."""

    eligible: bool
    reason: str | None = None


@dataclass(frozen=True)
class StoreOutcome:
    """What the ingest did with one C-STORE request."""

    job_id: int
    duplicate: bool
    conflict: bool
    state: JobState


@dataclass(frozen=True)
class JobView:
    """A job row as the CLI and web read it."""

    job_id: int
    sop_instance_uid: str
    study_instance_uid: str
    state: JobState
    reason: str | None
    received_at: datetime
    calling_ae: str
    attempts: int


@dataclass(frozen=True)
class IncomingInstance:
    """Everything the ingest records about one received instance (PHI stays in the database)."""

    ref: InstanceRef
    spool_path: str
    sha256: str
    size_bytes: int
    calling_ae: str
    peer_host: str | None
    eligibility: Eligibility
    modality: str | None = None
    body_part: str | None = None
    laterality: str | None = None
    view_position: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    accession_number: str | None = None


@dataclass(frozen=True)
class LeasedJob:
    """A job handed to a worker until ``lease_expires_at``."""

    job_id: int
    attempts: int
    spool_path: str
    ref: InstanceRef


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced a finding (goes into the SR's algorithm identification)."""

    name: str  # "STR-Net"
    version: str  # the checkpoint's version string
    checkpoint_sha256: str


@dataclass(frozen=True)
class ServedModel:
    """What the service says about the model it screens with (the web status page, the SR)."""

    algorithm: AlgorithmInfo
    threshold: float  # the operating threshold in use
    thresholds: dict[str, float]  # the checkpoint's named operating points
    tscore_coverage: float  # nominal coverage of the T-score interval
    device: str  # "cpu", "cuda:0"


@dataclass(frozen=True)
class Findings:
    """STR-Net's answer for one screened image. ``saliency`` is (H, W) in [0, 1] or None, over
    ``region`` of the source image (served: restricted to bone by model/saliency.py; all NaN when
    no bone was found in the square)."""

    probability: float  # calibrated P(bone loss)
    threshold: float  # the served operating threshold
    bone_loss: bool  # probability >= threshold
    p_osteoporosis_given_bone_loss: float  # P(osteoporosis | bone loss); model/ calls the joint one p_osteoporosis
    severity: str | None  # "osteopenia" | "osteoporosis" when bone_loss, else None
    t_score: float  # estimated DXA T-score
    t_score_low: float  # conformal interval
    t_score_high: float
    interval_coverage: float  # nominal coverage of that interval, e.g. 0.9
    algorithm: AlgorithmInfo
    saliency: Any = None  # numpy array; Any keeps numpy out of the domain types
    # the square the model assessed, in the source image's pixel coordinates (row0, col0, row1,
    # col1; ends exclusive; may reach past the edges when the film was padded); the saliency map
    # covers exactly this square. None: not known (results recorded before it was kept).
    region: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class KneeFindings:
    """One knee's result in a study: its screened films combined (model/knee.py, through
    agent/pipeline/knees.py). ``images`` are the films' indices in the study's findings."""

    laterality: str | None  # "L" or "R"; None: a film of unknown side, a knee of its own
    images: tuple[int, ...]
    probability: float  # P(bone loss) from the mean of the films' calibrated logits
    threshold: float  # the served threshold the films were decided at
    bone_loss: bool  # probability >= threshold
    p_osteoporosis_given_bone_loss: float  # from the mean severity logit
    severity: str | None  # "osteopenia" | "osteoporosis" when bone_loss, else None
    t_score: float  # mean of the films' T-scores
    t_score_low: float  # t_score -/+ the conformal half-width
    t_score_high: float
    interval_coverage: float
