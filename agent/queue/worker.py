"""The worker: lease jobs, screen them, and turn every outcome into committed rows.

It leases (never dequeue-then-run): a crash leaves a lease that expires or is reset at start-up,
and the job runs again; result UIDs are deterministic, so a rerun produces the same objects.

Overlays are built in the report helper process (``reporting.build_processes``): the worker
thread hands each screened image over and screens the next batch, and a completion thread
records each image, in order, once its overlay is written. Until then the job stays leased.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
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
from agent.reporting.builder import BuiltOverlay, ReportBuilder
from agent.reporting.overlay import reduce_image

log = get_logger(__name__)

RETRY_DELAY_S = 30.0
PENDING_BATCHES = 2  # overlays in the helper, in batches: one being built while the next is screened


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


@dataclass
class _Pending:
    """A screened image waiting for its overlay; its job stays leased until it is recorded."""

    job: LeasedJob
    findings: Findings
    timings_ms: dict[str, float]
    handed_off: float  # perf_counter
    overlay: futures.Future[BuiltOverlay] | None  # None: overlays are off
    ready: float | None = None  # perf_counter when the bytes were ready

    def mark_ready(self, _future: object = None) -> None:
        self.ready = time.perf_counter()


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
        self._stats_lock = threading.Lock()  # the worker and the completion thread both count
        # screened images whose overlay is in the helper, oldest first (the completion thread's)
        self._pending: deque[_Pending] = deque()
        self._pending_cv = threading.Condition()
        self._completer: threading.Thread | None = None
        self._abandon = threading.Event()  # stop(): the completion thread ends, leaving the rest leased

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
        """Stop screening, record what the helper finishes within ``timeout_s``, close the helper.

        Overlays still pending then are abandoned: their jobs stay leased (the lease reaper or
        the next start-up hands them out again)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self.wake.set()
        with self._pending_cv:
            self._pending_cv.notify_all()  # a worker waiting for room
        if self._thread:
            self._thread.join(timeout_s)
        left = self.drain(max(1.0, deadline - time.monotonic()))
        with self._pending_cv:
            self._abandon.set()
            self._pending_cv.notify_all()
        if self._completer is not None:
            self._completer.join(1.0)
        if left:
            log.warning("worker_overlays_abandoned", jobs=left)
        self.report_builder.close(wait=not left)  # never wait on a build that did not finish

    def drain(self, timeout_s: float) -> int:
        """Wait until every handed-over image is recorded; returns how many are still pending."""
        deadline = time.monotonic() + timeout_s
        with self._pending_cv:
            while self._pending and (remaining := deadline - time.monotonic()) > 0:
                self._pending_cv.wait(min(remaining, 0.5))
            return len(self._pending)

    def warm_up(self) -> None:
        """Run the whole per-image path once on a blank image, writing nothing.

        The first inference, Grad-CAM, font load and highdicom build of a process cost about a
        second; paid here, at start-up, instead of by the first study's latency.
        """
        t0 = time.perf_counter()
        try:
            size = self.screener.predictor.input_size
            blank = np.zeros((1, 1, size, size), np.float32)
            texture = self.screener.texture(np.zeros((64, 48), np.float32))
            features = None if texture is None else texture[None]
            findings, _ = self.screener.score(blank, [{"age": None, "sex": None, "bmi": None}], features)
            # the overlay and SR paths, in the helper (in the background) or here (inline)
            self.report_builder.warm_up(_warm_up_source(), np.zeros((64, 48), np.float32), findings)
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

    def max_pending(self) -> int:
        """Screened images whose overlay may be in the helper at once (backpressure)."""
        return PENDING_BATCHES * self.batch_size()

    def _wait_for_room(self) -> bool:
        """Wait (before leasing) until a whole batch fits among the pending overlays; False: stopping."""
        room = self.max_pending() - self.batch_size()
        with self._pending_cv:
            while len(self._pending) > room and not self._stop.is_set():
                self._pending_cv.wait(0.5)
        return not self._stop.is_set()

    def run_once(self) -> int:
        """Screen one batch; returns how many jobs it handled (recorded, or handed over)."""
        self._maybe_reload()
        if not self._wait_for_room():
            return 0
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
                with self._stats_lock:
                    self.stats.skipped += 1
                log.info("job_skipped", job_id=outcome.job.job_id, reason=outcome.reason)
            elif isinstance(outcome, Failed):
                self._failed(outcome.job, outcome.error)
        return len(jobs)

    def _screened(self, o: Screened) -> None:
        """Start the overlay and hand the image to the completion thread; inline (no helper, or
        overlays off) record it now, as the only path did before the helper."""
        p = _Pending(o.job, o.findings, o.timings_ms, time.perf_counter(), None)
        if self.settings.reporting.overlay:
            number = int(o.dataset.get("InstanceNumber") or 1)
            image = reduce_image(o.pixels)  # a quarter of a large film's bytes to the helper
            p.overlay = self.report_builder.submit_overlay(o.dataset, image, o.findings, number)
            p.overlay.add_done_callback(p.mark_ready)
        else:
            p.mark_ready()
        if p.overlay is None or self.report_builder.processes <= 0:
            self._record(p)
            return
        with self._pending_cv:
            self._pending.append(p)
            self._pending_cv.notify_all()
        if self._completer is None:
            self._completer = threading.Thread(target=self._complete_loop, name="strnet-overlays", daemon=True)
            self._completer.start()

    def _complete_loop(self) -> None:
        """The completion thread: record each handed-over image, in order, once its overlay is built."""
        while True:
            with self._pending_cv:
                while not self._pending and not self._abandon.is_set():
                    self._pending_cv.wait()
                if self._abandon.is_set():
                    return  # stop() gave up: what is pending stays leased
                p = self._pending[0]
            assert p.overlay is not None
            while not p.overlay.done() and not self._abandon.is_set():
                futures.wait([p.overlay], timeout=0.2)
            if self._abandon.is_set():
                return
            try:
                self._record(p)
            except StorageError as exc:  # the job stays leased; the lease reaper hands it out again
                log.error("worker_database_error", error=str(exc))
            except Exception as exc:  # a bug must not stop recording for good
                log.exception("worker_crashed", error=exc.__class__.__name__)
            with self._pending_cv:
                self._pending.popleft()
                self._pending_cv.notify_all()

    def _record(self, p: _Pending) -> None:
        """Write the overlay, then result, outbox rows and job DONE in one commit."""
        overlay_obj = None
        if p.overlay is not None:
            try:
                built = p.overlay.result()
            except (ValueError, TypeError) as exc:
                self._failed(p.job, f"overlay could not be built: {exc}")
                return
            except ProcessingError as exc:  # the helper died (a new one builds the retry) or closed
                self._failed(p.job, str(exc))
                return
            overlay_obj = self._write_result("sc", built.data, built.sop_class_uid, built.sop_instance_uid)
        ready = p.ready if p.ready is not None else time.perf_counter()
        timings = {**p.timings_ms, "report": round((ready - p.handed_off) * 1000, 1)}
        failpoints.hit("results_built")
        ok = screening.record_screening(
            self.db,
            p.job.job_id,
            self.owner,
            p.findings,
            timings,
            overlay_obj,
            self.destinations,
            self.settings.sender.send,
        )
        if not ok:
            log.warning("job_lease_lost", job_id=p.job.job_id)
            return
        if overlay_obj is not None and self.on_outbox is not None:
            self.on_outbox()
        with self._stats_lock:
            self.stats.screened += 1
        metrics.INFERENCE_SECONDS.observe(p.timings_ms.get("infer", 0.0) / 1000)
        f = p.findings
        log.info(
            "inference_done",
            job_id=p.job.job_id,
            sop_instance_uid=p.job.ref.sop_instance_uid,
            study_instance_uid=p.job.ref.study_instance_uid,
            probability=round(f.probability, 4),
            bone_loss=f.bone_loss,
            severity=f.severity,
            t_score=round(f.t_score, 2),
            ms=timings,
        )

    def _failed(self, job: LeasedJob, error: str) -> None:
        with self._stats_lock:
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
