"""Queue semantics on a temporary SQLite file: record, lease, finish, reap, requeue."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.audit import trail
from agent.db.engine import Database, upgrade
from agent.db.models import AuditEvent
from agent.domain import Eligibility, IncomingInstance, InstanceRef, JobState
from agent.queue import store


@pytest.fixture()
def db(db_url: str) -> Database:
    d = Database(db_url)
    upgrade(d)
    return d


def incoming(n: int, sha: str | None = None, eligible: bool = True) -> IncomingInstance:
    ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", f"1.2.3.{n}", "1.2.3.999", "1.2.3.998", "1.2.840.10008.1.2.1")
    return IncomingInstance(
        ref=ref,
        spool_path=f"d/{n}-{sha or 'a'}.dcm",
        sha256=sha or f"{n:064d}",
        size_bytes=10,
        calling_ae="TESTSCU",
        peer_host="127.0.0.1",
        eligibility=Eligibility(eligible, None if eligible else "not a knee"),
        patient_name="Doe^Jane",
        patient_id="P1",
    )


def test_record_creates_one_queued_job_and_one_study(db: Database) -> None:
    a = store.record_instance(db, incoming(1))
    b = store.record_instance(db, incoming(2))
    assert a.state == b.state == JobState.QUEUED
    jobs = store.list_jobs(db)
    assert [j.job_id for j in jobs] == [a.job_id, b.job_id]
    assert {j.study_instance_uid for j in jobs} == {"1.2.3.999"}


def test_before_commit_runs_with_the_rows_written_but_not_yet_committed(db: Database) -> None:
    # the ingest handler makes the spool file durable here: the commit must wait for it
    seen: list[int] = []

    def durable() -> None:
        seen.append(len(store.list_jobs(db)))  # another session: the new row is not visible yet

    store.record_instance(db, incoming(1), before_commit=durable)
    assert seen == [0] and len(store.list_jobs(db)) == 1


def test_a_failing_before_commit_leaves_nothing(db: Database) -> None:
    from agent.errors import StorageError

    def fsync_failed() -> None:
        raise StorageError("spool write failed: Input/output error")

    with pytest.raises(StorageError):
        store.record_instance(db, incoming(1), before_commit=fsync_failed)
    assert store.list_jobs(db) == []
    again = store.record_instance(db, incoming(1))  # the resend is a new instance, not a duplicate
    assert not again.duplicate and len(store.list_jobs(db)) == 1


def test_before_commit_is_not_run_for_a_duplicate(db: Database) -> None:
    store.record_instance(db, incoming(1))
    calls: list[str] = []
    again = store.record_instance(db, incoming(1), before_commit=lambda: calls.append("x"))
    assert again.duplicate and calls == []


def test_same_uid_same_bytes_is_a_duplicate(db: Database) -> None:
    a = store.record_instance(db, incoming(1))
    again = store.record_instance(db, incoming(1))
    assert again.duplicate and again.job_id == a.job_id
    assert len(store.list_jobs(db)) == 1


def test_same_uid_other_bytes_keeps_both_and_flags(db: Database) -> None:
    store.record_instance(db, incoming(1, sha="a" * 64))
    other = store.record_instance(db, incoming(1, sha="b" * 64))
    assert other.conflict and other.state == JobState.SKIPPED
    jobs = store.list_jobs(db)
    assert len(jobs) == 2
    assert "conflict" in (jobs[1].reason or "")
    with db.reading() as s:
        assert trail.verify(s).ok
        # docs/architecture.md: "a Security Alert audit event records it" (the first copy had none)
        alerts = s.execute(select(AuditEvent).where(AuditEvent.event_code == "110113")).scalars().all()
    assert [(a.object_id, a.outcome, a.detail["problem"]) for a in alerts] == [("1.2.3.1", 4, "conflicting duplicate")]


def test_ineligible_is_skipped_with_reason(db: Database) -> None:
    out = store.record_instance(db, incoming(1, eligible=False))
    assert out.state == JobState.SKIPPED
    assert store.list_jobs(db)[0].reason == "not eligible: not a knee"


def test_lease_finish_and_lost_lease(db: Database) -> None:
    for n in range(3):
        store.record_instance(db, incoming(n))
    leased = store.lease(db, "w1", limit=2, lease_s=60)
    assert [j.attempts for j in leased] == [1, 1]
    assert store.lease(db, "w2", limit=5, lease_s=60)[0].job_id == 3  # only the third is free
    assert store.finish(db, leased[0].job_id, "w1", JobState.DONE)
    assert not store.finish(db, leased[1].job_id, "someone-else", JobState.DONE)
    states = {j.job_id: j.state for j in store.list_jobs(db)}
    assert states == {1: JobState.DONE, 2: JobState.RUNNING, 3: JobState.RUNNING}


def test_expired_lease_is_reaped_and_leased_again(db: Database) -> None:
    store.record_instance(db, incoming(1))
    first = store.lease(db, "w1", limit=1, lease_s=0.05)
    time.sleep(0.1)
    assert store.reap_expired_leases(db) == 1
    second = store.lease(db, "w2", limit=1, lease_s=60)
    assert second[0].job_id == first[0].job_id and second[0].attempts == 2
    assert not store.finish(db, first[0].job_id, "w1", JobState.DONE)  # the old owner lost it


def test_failed_job_waits_then_is_leased_again(db: Database) -> None:
    store.record_instance(db, incoming(1))
    job = store.lease(db, "w1", 1, 60)[0]
    assert store.fail(db, job.job_id, "w1", delay_s=30, reason="inference failed")
    assert store.list_jobs(db)[0].state == JobState.FAILED
    assert store.lease(db, "w1", 1, 60) == []  # not before 30 s
    assert store.fail(db, job.job_id, "w1", delay_s=0, reason="x") is False  # no lease held
    assert store.replay(db, [job.job_id]) == 1
    assert store.lease(db, "w1", 1, 60)[0].job_id == job.job_id


def test_requeue_running_at_startup(db: Database) -> None:
    store.record_instance(db, incoming(1))
    store.lease(db, "w1", 1, 600)
    assert store.requeue_running(db) == 1
    assert store.list_jobs(db)[0].state == JobState.QUEUED


def test_spool_retention_removes_a_file_spool_days_after_its_receipt_once_its_job_is_terminal(
    db: Database, tmp_path: Path
) -> None:
    """retention.spool_days counts from the instance's receipt (received_at); the job must be
    terminal and the study have nothing left to deliver (that part: test_commitment_records.py)."""
    from sqlalchemy import update

    from agent.clock import utcnow
    from agent.db.models import Instance
    from agent.scheduler import apply_spool_retention
    from agent.spool import Spool

    spool = Spool(tmp_path / "spool")
    rel = spool.write_named(incoming(1).spool_path, [b"x"])
    store.record_instance(db, incoming(1, eligible=False))  # SKIPPED: terminal, nothing to deliver
    week = 7 * 86400.0
    assert apply_spool_retention(db, spool, week) == 0 and spool.path(rel).exists()  # received just now
    with db.transaction() as s:
        s.execute(update(Instance).values(received_at=utcnow() - timedelta(days=8)))
    assert apply_spool_retention(db, spool, week) == 1 and not spool.path(rel).exists()
    assert apply_spool_retention(db, spool, week) == 0  # marked removed: not counted again


def test_the_spool_sweep_removes_part_files_untouched_for_an_hour(db: Database, tmp_path: Path) -> None:
    """docs/operations.md, Retention, and ADR 0006: the spool sweep deletes a ``.part`` file untouched for an hour
    (a transfer that broke off), never one still arriving, and logs ``spool_partials_removed``."""
    import os
    import time

    import structlog

    from agent.scheduler import STALE_PART_S, apply_spool_retention
    from agent.spool import Spool

    assert STALE_PART_S == 3600.0
    spool = Spool(tmp_path / "spool")
    old, fresh = spool.tmp_dir / "old.dcm.part", spool.tmp_dir / "fresh.dcm.part"
    old.write_bytes(b"broken-off transfer")
    fresh.write_bytes(b"still arriving")
    os.utime(old, (time.time() - 3700, time.time() - 3700))
    with structlog.testing.capture_logs() as logs:
        apply_spool_retention(db, spool, 7 * 86400.0)
    assert not old.exists() and fresh.exists()
    assert [(e["event"], e["removed"]) for e in logs] == [("spool_partials_removed", 1)]


def test_spool_retention_keeps_a_dead_jobs_file_for_its_replay(db: Database, tmp_path: Path) -> None:
    """A job given up (DEAD) keeps its spool file past spool_days: ``strnet jobs retry`` replays
    it from that file once the cause is fixed (docs/operations.md, Retention)."""
    from sqlalchemy import update

    from agent.clock import utcnow
    from agent.db.models import Instance, Job
    from agent.scheduler import apply_spool_retention
    from agent.spool import Spool

    spool = Spool(tmp_path / "spool")
    rel = spool.write_named(incoming(1).spool_path, [b"x"])
    store.record_instance(db, incoming(1))
    (job,) = store.lease(db, "w", 1, 60.0)
    assert store.finish(db, job.job_id, "w", JobState.DEAD, "gave up after 8 attempts: test")
    with db.transaction() as s:
        s.execute(update(Instance).values(received_at=utcnow() - timedelta(days=30)))
    assert apply_spool_retention(db, spool, 7 * 86400.0) == 0 and spool.path(rel).exists()
    assert store.replay(db) == 1
    (again,) = store.lease(db, "w", 1, 60.0)
    assert spool.path(again.spool_path).read_bytes() == b"x"
    assert store.finish(db, again.job_id, "w", JobState.DONE)
    assert apply_spool_retention(db, spool, 7 * 86400.0) == 1 and not spool.path(rel).exists()
    with db.reading() as s:
        assert s.query(Job.state).scalar() == JobState.DONE.value


def test_lease_due_takes_srs_first_and_a_share_of_what_is_due(db: Database) -> None:
    from sqlalchemy import select

    from agent.db.models import Study
    from agent.queue import outbox

    store.record_instance(db, incoming(1))
    with db.transaction() as s:
        study_id = s.execute(select(Study.id)).scalar_one()
        for n, kind in enumerate(["sc", "sc", "sc", "sr"]):
            obj = outbox.OutgoingObject(kind, "1.2.3", f"1.2.3.{n}", f"r/{n}.dcm")
            outbox.add(s, study_id, obj, ["pacs"], send=True)
    first = outbox.lease_due(db, share=2)  # two lanes: this one takes half of the four
    assert [i.kind for i in first] == ["sr", "sc"]
    second = outbox.lease_due(db, share=2)  # half of the two left
    assert [i.sop_instance_uid for i in second] == ["1.2.3.1"]
    assert [i.sop_instance_uid for i in outbox.lease_due(db)] == ["1.2.3.2"]
    assert outbox.lease_due(db) == []


def test_findings_stored_in_a_result_row_read_back_the_same() -> None:
    """screening.store_findings and findings_of are each other's inverse, but for what the row
    does not keep (the saliency map; the coverage and the algorithm's name come from the served model)."""
    import dataclasses

    from agent.db.models import Result
    from agent.domain import AlgorithmInfo, Findings, ServedModel
    from agent.queue import screening

    for severity, bone_loss, region in (("osteoporosis", True, (48, -30, 300, 222)), (None, False, None)):
        found = Findings(0.8731, 0.4217, bone_loss, 0.71, severity, -2.73, -3.41, -1.96, 0.9,
                         AlgorithmInfo("STR-Net", "v1", "ab" * 32), saliency=[[0.5]], region=region)  # fmt: skip
        row = Result()
        screening.store_findings(row, found)
        served = ServedModel(AlgorithmInfo("STR-Net", "v2", "cd" * 32), 0.5, {}, 0.8, "cpu")
        back = screening.findings_of(row, served)
        assert back == dataclasses.replace(found, saliency=None, interval_coverage=0.8)
