"""The job queue on the audit database: record, lease, acknowledge, fail, reap.

Workers lease jobs and acknowledge them; a crash leaves a lease that expires and the job is
handed out again (never dequeue-then-run). Every transition is one committed row change.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import Instance, Job, OutboxItem, Study
from agent.db.upsert import insert_if_absent
from agent.domain import (
    IncomingInstance,
    InstanceRef,
    JobState,
    JobView,
    LeasedJob,
    OutboxState,
    StoreOutcome,
)
from agent.queue import sweeps
from agent.queue.cluster import SOLO, NodeScope, mine, node_value, own, owned

CONFLICT_REASON = "conflict: SOP Instance UID already received with different content"


def existing_contents(db: Database, sop_instance_uid: str) -> dict[str, int]:
    """sha256 -> job id of every instance already received under this SOP Instance UID."""
    with db.reading() as s:
        rows = s.execute(
            select(Instance.sha256, Job.id)
            .join(Job, Job.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == sop_instance_uid)
        ).all()
    return {sha: job_id for sha, job_id in rows}


def record_instance(
    db: Database, inc: IncomingInstance, before_commit: Callable[[], None] | None = None, node: str | None = None
) -> StoreOutcome:
    """Commit study, instance, job and audit rows for a spooled instance, in one transaction.

    Returns the outcome; a concurrent identical instance (same UID and bytes) reports
    ``duplicate=True`` and the caller removes its spool file. ``before_commit`` runs after the
    study, instance and job rows are written and before the audit events and the commit, and only
    when there is something to commit: the ingest handler makes the spool file durable there, so
    the row work overlaps its fsync and the commit still follows it. Whatever it raises rolls the
    transaction back. ``node``: the agent that holds the spool file (agent.node).
    """
    now = utcnow()
    try:
        with db.transaction() as s:
            prior = s.execute(
                select(Instance.id, Instance.sha256, Job.id)
                .join(Job, Job.instance_id == Instance.id)
                .where(Instance.sop_instance_uid == inc.ref.sop_instance_uid)
                .order_by(Instance.id)
            ).all()
            for _iid, sha, job_id in prior:
                if sha == inc.sha256:
                    return StoreOutcome(job_id, duplicate=True, conflict=False, state=JobState.QUEUED)
            # another process may be creating the same study right now: insert unless there, then
            # read it locked (FOR UPDATE on PostgreSQL) for the updates below
            insert_if_absent(
                s,
                Study,
                {
                    "study_instance_uid": inc.ref.study_instance_uid,
                    "first_received_at": now,
                    "last_received_at": now,
                    "last_calling_ae": inc.calling_ae,
                },
                ["study_instance_uid"],
            )
            study = s.execute(
                select(Study)
                .where(Study.study_instance_uid == inc.ref.study_instance_uid)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).scalar_one()
            study.patient_id = inc.patient_id or study.patient_id
            study.patient_name = inc.patient_name or study.patient_name
            study.patient_birth_date = inc.patient_birth_date or study.patient_birth_date
            study.patient_sex = inc.patient_sex or study.patient_sex
            study.study_date = inc.study_date or study.study_date
            study.accession_number = inc.accession_number or study.accession_number
            study.last_received_at = now
            study.last_calling_ae = inc.calling_ae
            s.flush()
            conflict_of = prior[0][0] if prior else None
            inst = Instance(
                study_id=study.id,
                sop_class_uid=inc.ref.sop_class_uid,
                sop_instance_uid=inc.ref.sop_instance_uid,
                series_instance_uid=inc.ref.series_instance_uid,
                transfer_syntax_uid=inc.ref.transfer_syntax_uid,
                modality=inc.modality,
                body_part=inc.body_part,
                laterality=inc.laterality,
                view_position=inc.view_position,
                spool_path=inc.spool_path,
                sha256=inc.sha256,
                size_bytes=inc.size_bytes,
                calling_ae=inc.calling_ae,
                peer_host=inc.peer_host,
                received_at=now,
                conflict_of_id=conflict_of,
                node=node,
            )
            s.add(inst)
            s.flush()
            if conflict_of is not None:
                state, reason = JobState.SKIPPED, f"{CONFLICT_REASON} (instance {conflict_of})"
            elif not inc.eligibility.eligible:
                state, reason = JobState.SKIPPED, f"not eligible: {inc.eligibility.reason}"
            else:
                state, reason = JobState.QUEUED, None
            job = Job(
                instance_id=inst.id,
                state=state.value,
                reason=reason,
                attempts=0,
                created_at=now,
                updated_at=now,
                priority=sweeps.priority_of(s, inc.ref.study_instance_uid),
            )
            s.add(job)
            s.flush()
            if before_commit is not None:
                before_commit()
            # the audit events last, once the file is durable: on PostgreSQL the chain's advisory
            # lock is held from the append to the commit, so no other writer waits on this fsync
            trail.append(
                s,
                "instances_transferred",
                actor=inc.calling_ae,
                action="C",
                object_type="instance",
                object_id=inc.ref.sop_instance_uid,
                detail={"job_id": job.id, "state": state.value, "peer_host": inc.peer_host},
            )
            if conflict_of is not None:
                trail.append(
                    s,
                    "security_alert",
                    actor=inc.calling_ae,
                    outcome=4,
                    object_type="instance",
                    object_id=inc.ref.sop_instance_uid,
                    detail={"problem": "conflicting duplicate", "kept_instances": [conflict_of, inst.id]},
                )
            return StoreOutcome(job.id, duplicate=False, conflict=conflict_of is not None, state=state)
    except IntegrityError:
        # the same UID and bytes committed by a concurrent association a moment ago
        jobs = existing_contents(db, inc.ref.sop_instance_uid)
        if inc.sha256 in jobs:
            return StoreOutcome(jobs[inc.sha256], duplicate=True, conflict=False, state=JobState.QUEUED)
        raise


def _view(job: Job, inst: Instance, study_uid: str) -> JobView:
    return JobView(
        job_id=job.id,
        sop_instance_uid=inst.sop_instance_uid,
        study_instance_uid=study_uid,
        state=JobState(job.state),
        reason=job.reason,
        received_at=inst.received_at,
        calling_ae=inst.calling_ae,
        attempts=job.attempts,
    )


def list_jobs(db: Database, state: JobState | None = None, limit: int = 1000) -> list[JobView]:
    with db.reading() as s:
        q = (
            select(Job, Instance, Study.study_instance_uid)
            .join(Instance, Job.instance_id == Instance.id)
            .join(Study, Instance.study_id == Study.id)
            .order_by(Job.id)
            .limit(limit)
        )
        if state is not None:
            q = q.where(Job.state == state.value)
        return [_view(j, i, uid) for j, i, uid in s.execute(q).all()]


def count_by_state(db: Database) -> dict[str, int]:
    with db.reading() as s:
        return dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())


def known_spool_paths(db: Database) -> set[str]:
    with db.reading() as s:
        return set(s.execute(select(Instance.spool_path)).scalars().all())


def lease(
    db: Database, owner: str, limit: int, lease_s: float, study_uid: str | None = None, scope: NodeScope = SOLO
) -> list[LeasedJob]:
    """Hand up to ``limit`` QUEUED jobs (of one study, when ``study_uid`` is given) to ``owner``
    until the lease expires. Node storage: only jobs whose instance this node holds."""
    now = utcnow()
    with db.transaction() as s:
        q = (
            select(Job, Instance, Study.study_instance_uid)
            .join(Instance, Job.instance_id == Instance.id)
            .join(Study, Instance.study_id == Study.id)
            .where(Job.state.in_([JobState.QUEUED.value, JobState.FAILED.value]))
            .where((Job.not_before.is_(None)) | (Job.not_before <= now))
            .where(owned(Instance.node, scope))
            .order_by(Job.priority, Job.id)  # live traffic first, then what a sweep retrieved
            .limit(limit)
        )
        if study_uid is not None:
            q = q.where(Study.study_instance_uid == study_uid)
        if db.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True, of=Job)
        out: list[LeasedJob] = []
        for job, inst, study_uid in s.execute(q).all():
            job.state = JobState.RUNNING.value
            job.lease_owner = owner
            job.node = node_value(scope)
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.attempts += 1
            job.updated_at = now
            ref = InstanceRef(
                inst.sop_class_uid,
                inst.sop_instance_uid,
                study_uid,
                inst.series_instance_uid,
                inst.transfer_syntax_uid,
            )
            out.append(LeasedJob(job.id, job.attempts, inst.spool_path, ref))
        return out


def _end_lease(db: Database, job_id: int, owner: str, **values: Any) -> bool:
    """End ``owner``'s lease of a RUNNING job with ``values``; False when the lease was lost meanwhile."""
    with db.transaction() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING.value)
            .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow(), **values)
        )
        return res.rowcount == 1  # type: ignore[attr-defined]


def finish(db: Database, job_id: int, owner: str, state: JobState, reason: str | None = None) -> bool:
    """Acknowledge a leased job with its outcome; False when the lease was lost meanwhile."""
    return _end_lease(db, job_id, owner, state=state.value, reason=reason)


def fail(db: Database, job_id: int, owner: str, delay_s: float, reason: str) -> bool:
    """A leased job failed; it is leased again after ``delay_s`` (the worker decides when DEAD)."""
    not_before = utcnow() + timedelta(seconds=delay_s)
    return _end_lease(db, job_id, owner, state=JobState.FAILED.value, reason=reason, not_before=not_before)


def release(db: Database, job_id: int, owner: str) -> bool:
    """Hand a leased job back unrun (its screening process was closed before it ran the job, or
    died while the service stopped): QUEUED again at once, and the lease counts as no attempt."""
    return _end_lease(db, job_id, owner, state=JobState.QUEUED.value, attempts=Job.attempts - 1)


def replay(db: Database, job_ids: list[int] | None = None) -> int:
    """DEAD or FAILED jobs (these, or all DEAD) go back to QUEUED."""
    now = utcnow()
    with db.transaction() as s:
        q = update(Job)
        if job_ids is None:
            q = q.where(Job.state == JobState.DEAD.value)
        else:
            q = q.where(Job.id.in_(job_ids), Job.state.in_([JobState.DEAD.value, JobState.FAILED.value]))
        res = s.execute(q.values(state=JobState.QUEUED.value, attempts=0, not_before=None, updated_at=now))
        return res.rowcount  # type: ignore[attr-defined]


def study_ids_of_jobs(db: Database, job_ids: list[int]) -> list[int]:
    with db.reading() as s:
        return list(
            s.execute(
                select(Instance.study_id).join(Job, Job.instance_id == Instance.id).where(Job.id.in_(job_ids))
            ).scalars()
        )


def reap_expired_leases(db: Database, scope: NodeScope = SOLO) -> int:
    """Jobs whose worker vanished go back to QUEUED: node storage, this node's own leases; shared
    storage, any node's (a dead node's work is taken over)."""
    now = utcnow()
    with db.transaction() as s:
        res = s.execute(
            update(Job)
            .where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
            .where(owned(Job.node, scope))
            .values(state=JobState.QUEUED.value, lease_owner=None, lease_expires_at=None, updated_at=now)
        )
        return res.rowcount  # type: ignore[attr-defined]


def requeue_running(db: Database, scope: NodeScope = SOLO) -> int:
    """At start-up: every RUNNING job this node leased goes back to QUEUED (another node's stay)."""
    now = utcnow()
    with db.transaction() as s:
        res = s.execute(
            update(Job)
            .where(Job.state == JobState.RUNNING.value)
            .where(mine(Job.node, scope))
            .values(state=JobState.QUEUED.value, lease_owner=None, lease_expires_at=None, updated_at=now)
        )
        return res.rowcount  # type: ignore[attr-defined]


def spool_removable(
    db: Database, older_than_s: float, limit: int = 500, scope: NodeScope = SOLO
) -> list[tuple[int, str]]:
    """(instance id, spool path) whose job is DONE or SKIPPED, whose study has nothing left to
    deliver, and which were received more than ``older_than_s`` ago; only this node's instances.
    A DEAD job's file stays however old: ``strnet jobs retry`` replays the job from it."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    undelivered = select(OutboxItem.study_id).where(
        OutboxItem.state.not_in([OutboxState.DELIVERED.value, OutboxState.COMMITTED.value, OutboxState.SHADOW.value,
                                 OutboxState.DISCARDED.value])
    )
    with db.reading() as s:
        rows = s.execute(
            select(Instance.id, Instance.spool_path)
            .join(Job, Job.instance_id == Instance.id)
            .where(Instance.spool_removed_at.is_(None), Instance.received_at < cutoff)
            .where(Job.state.in_([JobState.DONE.value, JobState.SKIPPED.value]))
            .where(Instance.study_id.not_in(undelivered))
            .where(own(Instance.node, scope))
            .limit(limit)
        ).all()
        return [(i, p) for i, p in rows]


def mark_spool_removed(db: Database, instance_ids: list[int]) -> None:
    with db.transaction() as s:
        s.execute(update(Instance).where(Instance.id.in_(instance_ids)).values(spool_removed_at=utcnow()))
