"""agent/queue/worker.py: overlays built in the real report helper process while the worker goes
on, recorded in order by the completion thread; build errors, a killed helper, stop(), inline mode.
What an overlay contains is tested in test_reporting.py; the helper itself in test_report_builder.py."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import agent_settings, free_port
from dicom_factory import SECONDARY_CAPTURE, knee_dx
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_reporting import _findings

from agent.app import load_screener, open_database
from agent.audit.models import Job, Result
from agent.config import Settings
from agent.domain import Eligibility, IncomingInstance, InstanceRef, JobState
from agent.ingest.spool import Spool
from agent.pipeline.run import Screened
from agent.queue import outbox, store
from agent.queue.outbox import OutboxState
from agent.queue.worker import Worker
from agent.reporting.builder import encode


def _settings(tmp_path: Path, processes: int = 1, **over: Any) -> Settings:
    worker = {"enabled": True, "device": "cpu", "max_wait_ms": 0, "max_batch": 2, **over.pop("worker", {})}
    reporting = {"build_processes": processes, **over.pop("reporting", {})}
    pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    return agent_settings(tmp_path / "agent", worker=worker, reporting=reporting, pacs=pacs, **over)


def _worker(tmp_path: Path, processes: int = 1, screener: Any = None, **over: Any) -> Worker:
    """A worker on its own database and spools; ``screener`` only where it screens (run_once)."""
    settings = _settings(tmp_path, processes, **over)
    db = open_database(settings)
    return Worker(settings, db, Spool(settings.spool_dir), Spool(settings.results_dir), screener)


def _queue(worker: Worker, n: int) -> list[pydicom.Dataset]:
    """``n`` knee images spooled and queued (one study), as the C-STORE handler leaves them."""
    study, out = generate_uid(), []
    for i in range(n):
        ds = knee_dx(study_uid=study, laterality="LR"[i % 2], seed=i, rows=96, cols=80)
        ds.InstanceNumber = i + 1
        data = encode(ds)
        rel = worker.spool.write_named(f"{ds.SOPInstanceUID}.dcm", [data])
        ref = InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), study, str(ds.SeriesInstanceUID),
                          str(ds.file_meta.TransferSyntaxUID))  # fmt: skip
        store.record_instance(
            worker.db,
            IncomingInstance(ref, rel, hashlib.sha256(data).hexdigest(), len(data), "TESTSCU", "127.0.0.1",
                             Eligibility(True), patient_id=str(ds.PatientID), patient_name=str(ds.PatientName)),
        )  # fmt: skip
        out.append(ds)
    return out


def _lease_screened(worker: Worker, datasets: list[pydicom.Dataset], pixels: Any = None) -> list[Screened]:
    """Lease the queued jobs and pair them with findings, as screen_batch returns them."""
    jobs = store.lease(worker.db, worker.owner, len(datasets), worker.settings.worker.lease_s)
    assert len(jobs) == len(datasets)
    findings = _findings(np.random.default_rng(3))
    return [
        Screened(job, ds, np.full((96, 80), 0.5, np.float32) if pixels is None else pixels, findings[i % 4],
                 {"decode": 1.0, "preprocess": 1.0, "infer": 1.0})
        for i, (job, ds) in enumerate(zip(jobs, datasets, strict=True))
    ]  # fmt: skip


def _job(worker: Worker, job_id: int) -> Job:
    with worker.db.reading() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _helper_pids(worker: Worker) -> list[int]:
    return list(worker.report_builder._pool._processes)  # type: ignore[union-attr]


def _occupy_helper(worker: Worker, seconds: float) -> Any:
    """Keep the one helper busy, so what is handed over next is surely still pending."""
    return worker.report_builder._submit(time.sleep, seconds)[1]


def test_run_once_hands_overlays_to_the_helper_and_records_them_done(tmp_path: Path, tiny_weights: Path) -> None:
    weights = {"weights": str(tiny_weights)}
    worker = _worker(tmp_path, screener=load_screener(_settings(tmp_path, worker=weights)), worker=weights)
    try:
        datasets = _queue(worker, 2)
        assert worker.run_once() == 2
        assert worker.drain(60) == 0
        jobs = store.list_jobs(worker.db)
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
        assert all(pid != os.getpid() for pid in _helper_pids(worker))  # built in the helper
        items = outbox.items(worker.db)
        assert [(i.kind, i.state, i.destination) for i in items] == [("sc", OutboxState.PENDING.value, "pacs")] * 2
        for item, ds in zip(items, datasets, strict=True):
            sc = pydicom.dcmread(worker.results.path(item.path))
            assert str(sc.SOPClassUID) == SECONDARY_CAPTURE == item.sop_class_uid
            assert str(sc.SOPInstanceUID) == item.sop_instance_uid
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
            assert sc.InstanceNumber == ds.InstanceNumber
        with worker.db.reading() as s:
            timings = list(s.execute(select(Result.timings_ms).order_by(Result.id)).scalars())
        assert all(t["report"] > 0 and "infer" in t for t in timings), timings
        assert worker.stats.screened == 2 and worker.stats.failed == 0
    finally:
        worker.stop(5)


def test_job_stays_leased_while_its_overlay_is_pending(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    try:
        [screened] = _lease_screened(worker, _queue(worker, 1))
        busy = _occupy_helper(worker, 3.0)
        worker._screened(screened)  # returns at once: the helper is busy
        job = _job(worker, screened.job.job_id)
        assert (job.state, job.lease_owner) == (JobState.RUNNING.value, worker.owner)
        assert outbox.items(worker.db) == []
        busy.result(30)
        assert worker.drain(30) == 0
        assert _job(worker, screened.job.job_id).state == JobState.DONE.value
        assert [i.kind for i in outbox.items(worker.db)] == ["sc"]
    finally:
        worker.stop(5)


def test_overlay_build_error_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    try:
        [screened] = _lease_screened(worker, _queue(worker, 1), pixels=np.zeros((2, 2, 2), np.float32))
        worker._screened(screened)
        assert worker.drain(60) == 0
        [job] = store.list_jobs(worker.db)
        assert job.state == JobState.FAILED
        assert job.reason is not None and job.reason.startswith("overlay could not be built: image must be")
        assert outbox.items(worker.db) == [] and worker.stats.failed == 1
    finally:
        worker.stop(5)


def test_killed_helper_fails_the_job_for_a_retry_and_a_new_helper_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.queue.worker.RETRY_DELAY_S", 0.0)  # lease the failed job again at once
    worker = _worker(tmp_path)
    try:
        datasets = _queue(worker, 1)
        [screened] = _lease_screened(worker, datasets)
        _occupy_helper(worker, 30.0)
        worker._screened(screened)
        [pid] = _helper_pids(worker)
        os.kill(pid, signal.SIGKILL)
        assert worker.drain(60) == 0
        [job] = store.list_jobs(worker.db)
        assert job.state == JobState.FAILED and "helper process died" in (job.reason or ""), job.reason
        assert outbox.items(worker.db) == []
        # the retry: leased again, built by a new helper, recorded
        [again] = _lease_screened(worker, datasets)
        assert again.job.job_id == screened.job.job_id and again.job.attempts == 2
        worker._screened(again)
        assert worker.drain(60) == 0
        assert _job(worker, again.job.job_id).state == JobState.DONE.value
        assert [i.kind for i in outbox.items(worker.db)] == ["sc"]
        assert pid not in _helper_pids(worker)
    finally:
        worker.stop(5)


def test_stop_abandons_pending_overlays_without_hanging_and_leaves_them_leased(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    [screened] = _lease_screened(worker, _queue(worker, 1))
    _occupy_helper(worker, 20.0)
    worker._screened(screened)
    t0 = time.monotonic()
    worker.stop(timeout_s=0.5)
    assert time.monotonic() - t0 < 10
    job = _job(worker, screened.job.job_id)
    assert (job.state, job.lease_owner) == (JobState.RUNNING.value, worker.owner)  # for the reaper
    assert outbox.items(worker.db) == []
    assert worker._completer is not None and not worker._completer.is_alive()


def test_inline_mode_records_in_the_worker_thread(tmp_path: Path) -> None:
    worker = _worker(tmp_path, processes=0, sender={"send": False})
    try:
        screened = _lease_screened(worker, _queue(worker, 2))
        for s in screened:
            worker._screened(s)
        # recorded before _screened returned: no helper, no completion thread
        assert [j.state for j in store.list_jobs(worker.db)] == [JobState.DONE, JobState.DONE]
        assert [i.state for i in outbox.items(worker.db)] == [OutboxState.SHADOW.value] * 2
        assert worker._completer is None and worker.report_builder._pool is None
    finally:
        worker.stop(5)


def test_overlays_off_records_without_building(tmp_path: Path) -> None:
    worker = _worker(tmp_path, reporting={"overlay": False})
    try:
        [screened] = _lease_screened(worker, _queue(worker, 1))
        worker._screened(screened)
        assert [j.state for j in store.list_jobs(worker.db)] == [JobState.DONE]
        assert outbox.items(worker.db) == [] and worker.report_builder._pool is None
    finally:
        worker.stop(5)
