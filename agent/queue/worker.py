"""The worker: lease jobs, screen them, and turn every outcome into committed rows.

It leases (never dequeue-then-run): a crash leaves a lease that expires or is reset at start-up,
and the job runs again; result UIDs are deterministic, so a rerun produces the same objects.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from agent import failpoints, metrics
from agent.audit.db import Database
from agent.config import Settings
from agent.domain import AlgorithmInfo, Findings, JobState, LeasedJob
from agent.errors import ProcessingError, StorageError
from agent.ingest.scp import AssociationTracker
from agent.ingest.spool import Spool
from agent.logging import get_logger
from agent.pipeline.infer import Screener
from agent.pipeline.run import Failed, Rejected, Screened, screen_batch
from agent.queue import screening, store
from agent.queue.outbox import OutgoingObject
from agent.reporting.builder import ReportBuilder
from agent.reporting.builder import encode as _encode
from agent.reporting.overlay import build_overlay

log = get_logger(__name__)

RETRY_DELAY_S = 30.0


def _warm_up_source() -> Dataset:
    """A minimal knee DX header for the warm-up (never stored, never sent)."""
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "WARMUP", "WARM^UP", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "000000", "", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "DX", 1, 1
    ds.BodyPartExamined, ds.ImageLaterality, ds.PatientOrientation = "KNEE", "L", ["L", "F"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 48, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


@dataclass
class WorkerStats:
    screened: int = 0
    skipped: int = 0
    failed: int = 0
    reports: int = 0


class Worker:
    """One screening worker (a thread of ``strnet serve``)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        results: Spool,
        screener: Screener,
        tracker: AssociationTracker | None = None,
        reload_screener: Callable[[], Screener] | None = None,
        on_outbox: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.results = results
        self.screener = screener
        self.tracker = tracker
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.destinations = [p.name for p in settings.pacs]
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wake = threading.Event()
        self._reload = reload_screener
        self._model_stamp = self._pointer_stamp()
        # called after each commit that queued objects for PACS (wakes the sender at once)
        self.on_outbox = on_outbox
        self.report_builder = ReportBuilder(settings.reporting.build_processes)

    # -- model updates ---------------------------------------------------------------------
    def _pointer_stamp(self) -> float | None:
        p = self.settings.data_dir / "models" / "current"
        return p.stat().st_mtime if p.exists() else None

    def _maybe_reload(self) -> None:
        """Swap models when `strnet model install` moved the pointer (checked before each batch)."""
        stamp = self._pointer_stamp()
        if stamp == self._model_stamp or self._reload is None or self.settings.worker.weights:
            return
        self._model_stamp = stamp
        try:
            new = self._reload()
        except Exception as exc:  # keep serving the old model rather than stop
            log.error("model_reload_failed", error=str(exc))
            return
        old = self.screener.algorithm.version
        self.screener = new
        log.warning("model_swapped", old=old, new=new.algorithm.version)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="strnet-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout_s)
        self.report_builder.close()

    def warm_up(self) -> None:
        """Run the whole per-image path once on a blank image, writing nothing.

        The first inference, Grad-CAM, font load and highdicom build of a process cost about a
        second; paid here, at start-up, instead of by the first study's latency.
        """
        t0 = time.perf_counter()
        try:
            size = self.screener.predictor.input_size
            blank = np.zeros((1, 1, size, size), np.float32)
            findings, _ = self.screener.score(blank, [{"age": None, "sex": None, "bmi": None}])
            source = _warm_up_source()
            _encode(build_overlay(source, np.zeros((64, 48), np.float32), findings[0]))
            self.report_builder.warm_up([source], findings)  # the helper warms up in the background
        except Exception as exc:  # a warm-up problem must not stop the worker; the real path reports
            log.warning("worker_warm_up_failed", error=exc.__class__.__name__)
            return
        log.info("worker_warmed_up", ms=round((time.perf_counter() - t0) * 1000, 1))

    def _loop(self) -> None:
        self.warm_up()
        while not self._stop.is_set():
            try:
                n = self.run_once()
            except StorageError as exc:
                log.error("worker_database_error", error=str(exc))
                n = 0
            except Exception as exc:  # a bug must not stop screening for good
                log.exception("worker_crashed", error=exc.__class__.__name__)
                n = 0
            if n == 0:
                self.wake.wait(0.5)
                self.wake.clear()

    # -- one pass --------------------------------------------------------------------------
    def batch_size(self) -> int:
        """``worker.max_batch``, or for 0 the device's default: on the CPU a batch of 8 saves a
        few ms of inference per image but makes each image wait for seven decodes and overlays
        (screening bench, K=10: 10,754 and 10,362 images/h at 2 against 9,189 and 8,561 at 8)."""
        if self.settings.worker.max_batch:
            return self.settings.worker.max_batch
        return 16 if str(self.screener.device).startswith("cuda") else 2

    def _lease_batch(self) -> list[LeasedJob]:
        cfg = self.settings.worker
        size = self.batch_size()
        jobs = store.lease(self.db, self.owner, size, cfg.lease_s)
        deadline = time.monotonic() + cfg.max_wait_ms / 1000
        while jobs and len(jobs) < size and time.monotonic() < deadline:
            time.sleep(min(0.01, cfg.max_wait_ms / 1000))
            jobs += store.lease(self.db, self.owner, size - len(jobs), cfg.lease_s)
        return jobs

    def run_once(self) -> int:
        """Screen one batch; returns how many jobs it handled."""
        self._maybe_reload()
        jobs = self._lease_batch()
        if not jobs:
            return 0
        for job in jobs:
            log.info("job_leased", job_id=job.job_id, attempt=job.attempts, sop_instance_uid=job.ref.sop_instance_uid)
        outcomes = screen_batch(jobs, self.spool.path, self.screener, self.settings.eligibility.max_pixels)
        failpoints.hit("mid_inference")
        for outcome in outcomes:
            if isinstance(outcome, Screened):
                self._screened(outcome)
            elif isinstance(outcome, Rejected):
                store.finish(self.db, outcome.job.job_id, self.owner, JobState.SKIPPED, outcome.reason)
                self.stats.skipped += 1
                log.info("job_skipped", job_id=outcome.job.job_id, reason=outcome.reason)
            elif isinstance(outcome, Failed):
                self._failed(outcome.job, outcome.error)
        return len(jobs)

    def _screened(self, o: Screened) -> None:
        t0 = time.perf_counter()
        overlay_obj = None
        try:
            if self.settings.reporting.overlay:
                sc = build_overlay(
                    o.dataset, o.pixels, o.findings, instance_number=int(o.dataset.get("InstanceNumber") or 1)
                )
                overlay_obj = self._write_result("sc", _encode(sc), str(sc.SOPClassUID), str(sc.SOPInstanceUID))
        except (ValueError, TypeError) as exc:
            self._failed(o.job, f"overlay could not be built: {exc}")
            return
        timings = {**o.timings_ms, "report": round((time.perf_counter() - t0) * 1000, 1)}
        failpoints.hit("results_built")
        ok = screening.record_screening(
            self.db,
            o.job.job_id,
            self.owner,
            o.findings,
            timings,
            overlay_obj,
            self.destinations,
            self.settings.sender.send,
        )
        if not ok:
            log.warning("job_lease_lost", job_id=o.job.job_id)
            return
        if overlay_obj is not None and self.on_outbox is not None:
            self.on_outbox()
        self.stats.screened += 1
        metrics.INFERENCE_SECONDS.observe(o.timings_ms.get("infer", 0.0) / 1000)
        f = o.findings
        log.info(
            "inference_done",
            job_id=o.job.job_id,
            sop_instance_uid=o.job.ref.sop_instance_uid,
            study_instance_uid=o.job.ref.study_instance_uid,
            probability=round(f.probability, 4),
            bone_loss=f.bone_loss,
            severity=f.severity,
            t_score=round(f.t_score, 2),
            ms=timings,
        )

    def _failed(self, job: LeasedJob, error: str) -> None:
        self.stats.failed += 1
        if job.attempts >= self.settings.worker.max_attempts:
            store.finish(self.db, job.job_id, self.owner, JobState.DEAD, f"failed {job.attempts} times: {error}")
            log.error("job_dead", job_id=job.job_id, error=error, attempts=job.attempts)
        else:
            store.fail(self.db, job.job_id, self.owner, RETRY_DELAY_S, error)
            log.warning("job_failed", job_id=job.job_id, error=error, attempt=job.attempts)

    def _write_result(self, kind: str, data: bytes, sop_class_uid: str, sop_instance_uid: str) -> OutgoingObject:
        rel = f"{sop_instance_uid}.dcm"  # our own deterministic UID: a safe file name
        self.results.write_named(rel, [data])
        return OutgoingObject(kind, sop_class_uid, sop_instance_uid, rel)

    # -- study reports ---------------------------------------------------------------------
    def report_ready_studies(self) -> int:
        """Build the SR of every study that is complete and quiet (the study-completion sweep)."""
        built = 0
        for ready in screening.ready_studies(self.db, self.settings.reporting.quiet_period_s):
            if self.tracker is not None and self.tracker.open_count(ready.last_calling_ae) > 0:
                continue  # the sender may still be sending this study: wait
            try:
                built += self._report(ready)
            except (ProcessingError, ValueError, TypeError, OSError) as exc:
                log.error("report_failed", study_instance_uid=ready.study_instance_uid, error=str(exc))
        return built

    def _report(self, ready: screening.ReadyStudy) -> int:
        rows = screening.study_findings(self.db, ready.study_id)
        sources = [dcmread(self.spool.path(p), stop_before_pixels=True) for p, _ in rows]
        findings = [
            Findings(
                probability=r.probability,
                threshold=r.threshold,
                bone_loss=r.bone_loss,
                p_osteoporosis=r.p_osteoporosis,
                severity=r.severity,
                t_score=r.t_score,
                t_score_low=r.t_score_low,
                t_score_high=r.t_score_high,
                interval_coverage=self.screener.predictor.tscore_coverage,
                algorithm=AlgorithmInfo(self.screener.algorithm.name, r.model_version, r.checkpoint_sha256),
            )
            for _, r in rows
        ]
        sr = self.report_builder.build_sr(sources, findings, ready.revision, ready.predecessor)
        obj = self._write_result("sr", sr.data, sr.sop_class_uid, sr.sop_instance_uid)
        recorded = screening.record_report(
            self.db, ready, obj, sr.series_instance_uid, self.destinations, self.settings.sender.send
        )
        if recorded:
            if self.on_outbox is not None:
                self.on_outbox()
            self.stats.reports += 1
            log.info(
                "report_built",
                study_instance_uid=ready.study_instance_uid,
                revision=ready.revision,
                images=len(rows),
                sop_instance_uid=obj.sop_instance_uid,
            )
            return 1
        return 0
