"""Rows written when an image is screened or a study's report is built, each in one commit.

A study whose SR cannot be built is recorded against that study alone (``record_report_failure``):
retried with backoff, given up after ``SR_MAX_ATTEMPTS`` (audited, on the status page) and replayed
by an operator (``replay_failed_reports``); it never holds up another study's SR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from agent.audit import trail
from agent.clock import utcnow
from agent.db import registry
from agent.db.engine import Database
from agent.db.models import (
    REPORT_DEAD,
    REPORT_RETRY,
    Instance,
    Job,
    KneeResult,
    Result,
    Study,
    StudyReport,
    StudyReportFailure,
)
from agent.domain import AlgorithmInfo, Findings, JobState, KneeFindings, ServedModel
from agent.queue import outbox, sweeps
from agent.queue.cluster import SOLO, NodeScope, mine, owned
from agent.queue.outbox import OutgoingObject

TERMINAL = (JobState.DONE.value, JobState.SKIPPED.value, JobState.DEAD.value)

# A study's SR that fails to build is tried again after SR_RETRY_BASE_S doubling up to
# SR_RETRY_MAX_S (times a jitter factor in [0.5, 1.5)), and given up after SR_MAX_ATTEMPTS builds:
# about an hour of tries, then an operator's `strnet jobs retry --dead`.
SR_MAX_ATTEMPTS = 8
SR_RETRY_BASE_S = 30.0
SR_RETRY_MAX_S = 3600.0


def store_findings(result: Result, findings: Findings) -> None:
    """Write ``findings`` into a result row (not kept: the saliency map, the coverage, the algorithm name)."""
    result.probability = findings.probability
    result.threshold = findings.threshold
    result.bone_loss = findings.bone_loss
    result.p_osteoporosis_given_bone_loss = findings.p_osteoporosis_given_bone_loss
    result.severity = findings.severity
    result.t_score = findings.t_score
    result.t_score_low = findings.t_score_low
    result.t_score_high = findings.t_score_high
    result.model_version = findings.algorithm.version
    result.checkpoint_sha256 = findings.algorithm.checkpoint_sha256
    result.assessed_region = None if findings.region is None else [int(v) for v in findings.region]


def findings_of(result: Result, served: ServedModel) -> Findings:
    """The findings a result row stores, as ``store_findings`` wrote them. What the row does not
    keep comes from the model being served: the algorithm's name and the interval's coverage."""
    return Findings(
        probability=result.probability,
        threshold=result.threshold,
        bone_loss=result.bone_loss,
        p_osteoporosis_given_bone_loss=result.p_osteoporosis_given_bone_loss,
        severity=result.severity,
        t_score=result.t_score,
        t_score_low=result.t_score_low,
        t_score_high=result.t_score_high,
        interval_coverage=served.tscore_coverage,
        algorithm=AlgorithmInfo(served.algorithm.name, result.model_version, result.checkpoint_sha256),
        region=_region(result.assessed_region),
    )


def _region(stored: Any) -> tuple[int, int, int, int] | None:
    if not isinstance(stored, list) or len(stored) != 4:
        return None
    r0, c0, r1, c1 = (int(v) for v in stored)
    return r0, c0, r1, c1


def record_screening(
    db: Database,
    job_id: int,
    owner: str,
    findings: Findings,
    timings_ms: dict[str, float],
    overlay: OutgoingObject | None,
    destinations: list[str],
    send: bool,
    node: str | None = None,
) -> bool:
    """Result row, overlay outbox rows (the file in ``node``'s results folder) and job DONE, in
    one transaction. The patient is flagged when the study is quiet (``record_knees``, before its
    SR is built): the decision is the knee's, of all the study's films.

    Returns False (and writes nothing) when this worker no longer holds the job's lease.
    """
    now = utcnow()
    with db.transaction() as s:
        job = s.get(Job, job_id)
        if job is None or job.lease_owner != owner or job.state != JobState.RUNNING.value:
            return False
        inst = s.get(Instance, job.instance_id)
        assert inst is not None
        study = s.get(Study, inst.study_id)
        assert study is not None
        result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none()
        if result is None:
            result = Result(job_id=job_id, instance_id=inst.id, study_id=study.id, created_at=now)
            s.add(result)
        store_findings(result, findings)
        result.overlay_sop_instance_uid = overlay.sop_instance_uid if overlay else None
        result.timings_ms = timings_ms
        s.flush()
        if overlay is not None:
            sent = send and sweeps.sends_results(s, study.study_instance_uid, job.priority)
            outbox.add(s, study.id, overlay, destinations, sent, priority=job.priority, node=node)
        job.state = JobState.DONE.value
        job.reason = None
        job.lease_owner = None
        job.lease_expires_at = None
        job.updated_at = now
        return True


@dataclass(frozen=True)
class ReadyStudy:
    study_id: int
    study_instance_uid: str
    last_calling_ae: str
    revision: int  # the revision to build
    predecessor: tuple[str, str, str] | None  # (study, series, SOP instance UID) of the last SR
    predecessor_id: int | None
    spool_paths: list[str]  # screened instances, for the SR's evidence
    result_count: int
    last_received_at: datetime | None = None  # the study's last receipt when it was found ready
    failed_attempts: int | None = None  # SR builds failed so far (None: no failure recorded)


def ready_studies(
    db: Database, quiet_period_s: float, scope: NodeScope = SOLO, study_id: int | None = None
) -> list[ReadyStudy]:
    """Studies quiet for the period, with every job terminal and results not yet reported.

    A study whose SR failed waits for its next attempt; one given up waits for an operator's
    replay. Either comes back at once when an instance of it arrived after the failure.

    Node storage: this node's part of each study (the instances it holds, the reports it built):
    a study split across nodes gets from each node an SR of the images that node holds, and the
    revisions of the study are numbered across nodes. ``study_id``: that study only."""
    now = utcnow()
    cutoff = now - timedelta(seconds=quiet_period_s)
    out: list[ReadyStudy] = []
    # Only studies with more results than their latest report covers: the sweep runs every few
    # seconds and must not walk every study ever screened (its cost would grow with the history).
    n_results = (
        select(func.count(Result.id))
        .join(Instance, Instance.id == Result.instance_id)
        .where(Result.study_id == Study.id, owned(Instance.node, scope))
        .correlate(Study)
        .scalar_subquery()
    )
    reported = (
        select(func.coalesce(func.max(StudyReport.result_count), 0))
        .where(StudyReport.study_id == Study.id, mine(StudyReport.node, scope))
        .correlate(Study)
        .scalar_subquery()
    )
    lowest_priority = (
        select(func.min(Job.priority))
        .join(Instance, Instance.id == Job.instance_id)
        .where(Instance.study_id == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )
    failure = StudyReportFailure
    due = or_(
        failure.id.is_(None),
        failure.study_received_at < Study.last_received_at,  # arrived since: it may fix the cause
        and_(
            failure.state == REPORT_RETRY,
            or_(failure.next_attempt_at.is_(None), failure.next_attempt_at <= now),
        ),
    )
    with db.reading() as s:
        q = (
            select(Study, failure.attempts)
            .outerjoin(failure, failure.study_id == Study.id)
            .where(Study.last_received_at <= cutoff)
            .where(n_results > reported)
            .where(due)
            # a live study before a swept one (its lowest job priority: live 0, swept SWEEP_PRIORITY),
            # then oldest first, each on its own
            .order_by(func.coalesce(lowest_priority, 0), Study.id)
        )
        if study_id is not None:
            q = q.where(Study.id == study_id)
        candidates = s.execute(q).all()
        for study, failed_attempts in candidates:
            pending = s.execute(
                select(func.count())
                .select_from(Job)
                .join(Instance, Instance.id == Job.instance_id)
                .where(Instance.study_id == study.id, Job.state.not_in(TERMINAL), owned(Instance.node, scope))
            ).scalar_one()
            if pending:
                continue
            results = s.execute(
                select(Result.id, Instance.spool_path)
                .join(Instance, Instance.id == Result.instance_id)
                .where(Result.study_id == study.id, owned(Instance.node, scope))
                .order_by(Instance.id)
            ).all()
            last = s.execute(
                select(StudyReport)
                .where(StudyReport.study_id == study.id, mine(StudyReport.node, scope))
                .order_by(StudyReport.revision.desc())
                .limit(1)
            ).scalar_one_or_none()
            if last is not None and last.result_count >= len(results):
                continue
            latest = s.execute(
                select(func.max(StudyReport.revision)).where(StudyReport.study_id == study.id)
            ).scalar_one()
            out.append(
                ReadyStudy(
                    study_id=study.id,
                    study_instance_uid=study.study_instance_uid,
                    last_calling_ae=study.last_calling_ae,
                    revision=(latest or 0) + 1,  # numbered across nodes
                    predecessor=(study.study_instance_uid, last.series_instance_uid, last.sop_instance_uid)
                    if last
                    else None,
                    predecessor_id=last.id if last else None,
                    spool_paths=[p for _, p in results],
                    result_count=len(results),
                    last_received_at=study.last_received_at,
                    failed_attempts=failed_attempts,
                )
            )
    return out


def study_findings(db: Database, study_id: int, scope: NodeScope = SOLO) -> list[tuple[str, Result]]:
    """(spool path, result) of every screened instance of the study (node storage: that this
    node holds), in receive order."""
    with db.reading() as s:
        rows = s.execute(
            select(Instance.spool_path, Result)
            .join(Result, Result.instance_id == Instance.id)
            .where(Result.study_id == study_id, owned(Instance.node, scope))
            .order_by(Instance.id)
        ).all()
        return [(p, r) for p, r in rows]


@dataclass(frozen=True)
class OutgoingMessage:
    """A message about the study (HL7, FHIR) for one destination, recorded with its SR."""

    obj: OutgoingObject
    destination: str
    send_swept: bool  # also when the archive sweep retrieved the study
    failed: str | None = None  # it could not be built: recorded DEAD with this reason


def record_messages(db: Database, study_id: int, messages: Sequence[OutgoingMessage], send: bool) -> int:
    """Outbox rows for messages about a study made outside its SR's commit (a radiologist's
    verdict sent onward); a row already there stays. Returns how many were added."""
    with db.transaction() as s:
        return sum(outbox.add(s, study_id, m.obj, [m.destination], send, failed=m.failed) for m in messages)


def record_report(
    db: Database,
    ready: ReadyStudy,
    sr: OutgoingObject,
    series_uid: str,
    destinations: list[str],
    send: bool,
    messages: Sequence[OutgoingMessage] = (),
    node: str | None = None,
    knees: Sequence[KneeFindings] = (),
    result_ids: Sequence[int] = (),
) -> bool:
    """The report row and its outbox rows (the SR for each PACS, each message for its
    destination); the revision's knee rows (``record_knees``) are linked to it, or recorded here
    with the flag when no one recorded them before (``knees``, their ``images`` indices into
    ``result_ids``); False when this revision was recorded already. A failure recorded for the
    study's SR is cleared."""
    with db.transaction() as s:
        if ready.failed_attempts is not None:
            s.execute(delete(StudyReportFailure).where(StudyReportFailure.study_id == ready.study_id))
        exists = s.execute(
            select(StudyReport.id).where(StudyReport.study_id == ready.study_id, StudyReport.revision == ready.revision)
        ).first()
        if exists:
            return False
        report = StudyReport(
            study_id=ready.study_id,
            revision=ready.revision,
            sop_instance_uid=sr.sop_instance_uid,
            series_instance_uid=series_uid,
            result_count=ready.result_count,
            predecessor_id=ready.predecessor_id,
            created_at=utcnow(),
            node=node,
        )
        s.add(report)
        s.flush()  # the report's id
        res = s.execute(
            update(KneeResult)
            .where(KneeResult.study_id == ready.study_id, KneeResult.revision == ready.revision,
                   KneeResult.report_id.is_(None))
            .values(report_id=report.id)
        )  # fmt: skip
        if not res.rowcount:  # type: ignore[attr-defined]
            _record_knees(s, ready.study_id, ready.revision, knees, result_ids, report.id)
        priority = sweeps.study_priority(s, ready.study_id)
        send = send and sweeps.sends_results(s, ready.study_instance_uid, priority)
        outbox.add(s, ready.study_id, sr, destinations, send, priority=priority, node=node)
        swept = priority == sweeps.SWEEP_PRIORITY  # every image of it retrieved by a sweep
        for m in messages:
            if not (swept and not m.send_swept):
                outbox.add(s, ready.study_id, m.obj, [m.destination], send, failed=m.failed, priority=priority,
                           node=node)  # fmt: skip
        trail.append(
            s,
            "instances_transferred",
            actor="strnet-worker",
            action="C",
            object_type="report",
            object_id=sr.sop_instance_uid,
            detail={"study_id": ready.study_id, "revision": ready.revision},
        )
        return True


def record_knees(db: Database, ready: ReadyStudy, knees: Sequence[KneeFindings], result_ids: Sequence[int]) -> bool:
    """The revision's knee rows and, when a knee is positive, the patient's flag, in one commit
    made before the SR is built: the decision is the knees' and does not wait on the SR (one that
    cannot be built is retried or given up, the flag stands). Once per revision and set of films:
    a retry with the same films finds its rows (False); a film that arrived since replaces the
    revision's unreported rows."""
    ids = sorted(int(result_ids[i]) for k in knees for i in k.images)
    with db.transaction() as s:
        rows = s.execute(
            select(KneeResult).where(KneeResult.study_id == ready.study_id, KneeResult.revision == ready.revision)
        ).scalars().all()  # fmt: skip
        if rows and sorted(i for r in rows for i in r.result_ids) == ids:
            return False
        for r in rows:
            if r.report_id is None:
                s.delete(r)
        _record_knees(s, ready.study_id, ready.revision, knees, result_ids, None)
        return True


def _record_knees(
    s: Any, study_id: int, revision: int, knees: Sequence[KneeFindings], result_ids: Sequence[int],
    report_id: int | None,
) -> None:  # fmt: skip
    """A knee_results row per knee; the flag from the most probable positive knee (a revision with
    none revises a flag an earlier revision raised on this study: ``registry.revise_flag``)."""
    if not knees:
        return
    now = utcnow()
    rows = []
    for k in knees:
        row = KneeResult(
            study_id=study_id, revision=revision, report_id=report_id, laterality=k.laterality,
            result_ids=[int(result_ids[i]) for i in k.images], n_images=len(k.images),
            probability=k.probability, threshold=k.threshold, bone_loss=k.bone_loss,
            p_osteoporosis_given_bone_loss=k.p_osteoporosis_given_bone_loss, severity=k.severity,
            t_score=k.t_score, t_score_low=k.t_score_low, t_score_high=k.t_score_high, created_at=now,
        )  # fmt: skip
        s.add(row)
        rows.append(row)
    s.flush()
    positive = [r for r in rows if r.bone_loss]
    study = s.get(Study, study_id)
    assert study is not None
    if positive:
        registry.upsert_flag(s, study, max(positive, key=lambda r: r.probability))
    else:  # an earlier revision, or this one's with fewer films, may have flagged on this study
        registry.revise_flag(s, study, max(rows, key=lambda r: r.probability))


@dataclass(frozen=True)
class ReportFailure:
    attempts: int  # failed builds of the study's SR so far (a later instance starts them afresh)
    dead: bool  # given up: waits for an operator's replay
    next_attempt_at: datetime | None  # when the sweep tries again (None when given up)


def record_report_failure(
    db: Database,
    ready: ReadyStudy,
    reason: str,
    jitter: float,
    max_attempts: int = SR_MAX_ATTEMPTS,
    base_s: float = SR_RETRY_BASE_S,
    max_s: float = SR_RETRY_MAX_S,
) -> ReportFailure:
    """Count a failed SR build against this study alone: tried again after a backoff, given up
    (and audited) at the ``max_attempts``-th. ``reason`` must hold no element value (``agent.errors.reason_of``);
    ``jitter`` in [0, 1) spreads the retries."""
    now = utcnow()
    with db.transaction() as s:
        received = ready.last_received_at
        if received is None:
            study = s.get(Study, ready.study_id)
            assert study is not None
            received = study.last_received_at
        row = s.execute(
            select(StudyReportFailure).where(StudyReportFailure.study_id == ready.study_id)
        ).scalar_one_or_none()
        if row is None:
            row = StudyReportFailure(study_id=ready.study_id, attempts=0, created_at=now)
            s.add(row)
        elif row.study_received_at < received:
            row.attempts = 0  # an instance arrived since the last failure: it may have fixed the cause
        row.attempts += 1
        row.study_received_at = received
        row.last_error = reason
        row.updated_at = now
        dead = row.attempts >= max_attempts
        if dead:
            row.state = REPORT_DEAD
            row.next_attempt_at = None
            trail.append(
                s,
                "application_activity",
                actor="strnet-worker",
                action="E",
                outcome=8,  # serious failure: the study gets no SR until an operator replays it
                object_type="study",
                object_id=str(ready.study_id),
                detail={
                    "change": "report_dead",
                    "revision": ready.revision,
                    "attempts": row.attempts,
                    "reason": reason,
                },
            )
        else:
            row.state = REPORT_RETRY
            row.next_attempt_at = outbox.next_attempt(row.attempts, base_s, max_s, jitter)
        return ReportFailure(row.attempts, dead, row.next_attempt_at)


def replay_failed_reports(db: Database, study_ids: list[int] | None = None) -> int:
    """SRs given up (of these studies in any failed state, or every one given up) are due again at
    the next sweep, with a fresh attempt count; the last reason stays until a build succeeds."""
    with db.transaction() as s:
        q = update(StudyReportFailure)
        if study_ids is None:
            q = q.where(StudyReportFailure.state == REPORT_DEAD)
        else:
            q = q.where(StudyReportFailure.study_id.in_(study_ids))
        res = s.execute(q.values(state=REPORT_RETRY, attempts=0, next_attempt_at=None, updated_at=utcnow()))
        return res.rowcount  # type: ignore[attr-defined]
