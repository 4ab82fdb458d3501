"""The worker: lease jobs, screen them, and turn every outcome into committed rows.

It leases (never dequeue-then-run): a crash leaves a lease that expires or is reset at start-up,
and the job runs again; result UIDs are deterministic, so a rerun produces the same objects.

Screening (decode, STR-Net, overlay build) runs in the screening process (``worker.process``,
agent/pipeline/process.py): the worker thread hands a leased batch over and leases the next while
it is screened, and a completion thread records each batch, in order, once its outcomes are back.
Until then its jobs stay leased. With ``worker.process = false`` the batch is screened and
recorded in the worker thread. A study's SR is the study reporter's (agent/queue/reporter.py).
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

from agent import failpoints, metrics
from agent.config import Settings
from agent.db.engine import Database
from agent.domain import JobState, LeasedJob
from agent.errors import HelperClosed, HelperDied, ProcessingError, StorageError, reason_of
from agent.logging import get_logger
from agent.pipeline.process import ScreeningEngine
from agent.pipeline.run import Failed, Finished, Recordable, Rejected
from agent.queue import screening, store
from agent.queue.cluster import scope_of
from agent.queue.outbox import write_object
from agent.spool import Spool

log = get_logger(__name__)

RETRY_DELAY_S = 30.0
PENDING_BATCHES = 2  # batches in the screening process: one screened while the next is leased


@dataclass
class WorkerStats:
    screened: int = 0
    skipped: int = 0
    failed: int = 0


@dataclass
class _Pending:
    """A batch handed to the screening engine; its jobs stay leased until it is recorded."""

    jobs: list[LeasedJob]
    outcomes: futures.Future[list[Recordable]]
    handed_off: float = 0.0  # monotonic


class Worker:
    """One screening worker (a thread of ``strnet serve``, screening in its screening process).

    ``screening``: the engine it screens with; ``reload`` makes a new one when `strnet model install`
    changes the served model. ``also_warm_up`` is called in the worker thread once the screening
    path is warm (the composition root warms the SR build up there).
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        results: Spool,
        screening: ScreeningEngine,
        reload: Callable[[], ScreeningEngine] | None = None,
        on_outbox: Callable[[], object] | None = None,
        also_warm_up: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.results = results
        self.screening = screening
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.scope = scope_of(settings)  # node storage: only jobs whose instance this node holds
        self.destinations = [p.name for p in settings.pacs]
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wake = threading.Event()
        self._reload = reload
        self._model_stamp = self._pointer_stamp()
        # called after each commit that queued objects for PACS (wakes the sender at once)
        self.on_outbox = on_outbox
        self.also_warm_up = also_warm_up
        self._stats_lock = threading.Lock()  # the worker and the completion thread both count
        # batches handed to the screening process, oldest first (the completion thread's)
        self._pending: deque[_Pending] = deque()
        self._pending_cv = threading.Condition()
        self._completer: threading.Thread | None = None
        self._abandon = threading.Event()  # stop(): the completion thread ends, leaving the rest leased

    # -- model updates ---------------------------------------------------------------------
    def _pointer_stamp(self) -> float | None:
        p = self.settings.data_dir / "models" / "current"
        return p.stat().st_mtime if p.exists() else None

    def _maybe_reload(self) -> None:
        """Swap models when `strnet model install` moved the pointer (checked before each batch):
        a new engine loads the new model; the batches the old one has are recorded first."""
        stamp = self._pointer_stamp()
        if stamp == self._model_stamp or self._reload is None or self.settings.worker.weights:
            return
        self._model_stamp = stamp
        try:
            new = self._reload()
        except Exception as exc:  # noqa: BLE001 - keep serving the old model rather than stop
            log.error("model_reload_failed", error=str(exc))
            return
        while self._pending and not self._stop.is_set():  # the old model's batches first
            self.drain(0.5)
        if self._stop.is_set():
            new.close(wait=False)
            return
        old, self.screening = self.screening, new
        old.close()
        log.warning("model_swapped", old=old.model.algorithm.version, new=new.model.algorithm.version)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="strnet-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stop screening, record what the screening process finishes within ``timeout_s`` and
        close it; returns how many jobs were abandoned.

        Batches still pending then are abandoned: their jobs stay leased (the lease reaper or the
        next start-up hands them out again), and the screening process is killed."""
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
            log.warning("worker_batches_abandoned", jobs=left)
        self.screening.close(wait=not left)  # a batch that did not finish: its process is killed
        return left

    def drain(self, timeout_s: float) -> int:
        """Wait until every handed-over batch is recorded; returns how many jobs are still pending."""
        deadline = time.monotonic() + timeout_s
        with self._pending_cv:
            while self._pending and (remaining := deadline - time.monotonic()) > 0:
                self._pending_cv.wait(min(remaining, 0.5))
            return sum(len(p.jobs) for p in self._pending)

    def warm_up(self) -> None:
        """Warm up the screening path (inline; a screening process did at its start), then what
        ``also_warm_up`` warms (the SR build, in its helper, in the background), writing nothing: a
        process's first inference, Grad-CAM, font load and highdicom build cost about a second,
        paid here instead of by the first study's latency."""
        t0 = time.perf_counter()
        try:
            self.screening.warm_up()
            if self.also_warm_up is not None:
                self.also_warm_up()
        except Exception as exc:  # noqa: BLE001 - a warm-up problem must not stop the worker; the real path reports
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
        return 16 if self.screening.model.device.startswith("cuda") else 2

    def _lease_batch(self) -> list[LeasedJob]:
        """The oldest queued job and up to ``batch_size() - 1`` more of its study. A batch never
        mixes studies: its results come back together, so a study's last image paired with the
        next study's first would wait for that image's decode and overlay too (~140 ms on the CPU),
        against ~4 ms of inference that batching saves."""
        cfg = self.settings.worker
        size = self.batch_size()
        jobs = store.lease(self.db, self.owner, 1, cfg.lease_s, scope=self.scope)
        if not jobs or size == 1:
            return jobs
        study = jobs[0].ref.study_instance_uid
        deadline = time.monotonic() + cfg.max_wait_ms / 1000
        while True:
            jobs += store.lease(self.db, self.owner, size - len(jobs), cfg.lease_s, study_uid=study, scope=self.scope)
            if len(jobs) >= size or time.monotonic() >= deadline:
                return jobs
            time.sleep(min(0.01, cfg.max_wait_ms / 1000))

    def _wait_for_room(self) -> bool:
        """Wait (before leasing) until fewer than PENDING_BATCHES batches are pending; False: stopping."""
        with self._pending_cv:
            while len(self._pending) >= PENDING_BATCHES and not self._stop.is_set():
                self._pending_cv.wait(0.5)
        return not self._stop.is_set()

    def run_once(self) -> int:
        """Hand one batch to the screening engine; returns how many jobs it leased. A batch that
        is screened at once (inline) and has nobody ahead of it is recorded here and now."""
        self._maybe_reload()
        if not self._wait_for_room():
            return 0
        jobs = self._lease_batch()
        if not jobs:
            return 0
        for job in jobs:
            log.info("job_leased", job_id=job.job_id, attempt=job.attempts, sop_instance_uid=job.ref.sop_instance_uid)
        paths = {j.spool_path: self.spool.path(j.spool_path) for j in jobs}
        p = _Pending(jobs, self.screening.submit(jobs, paths), time.monotonic())
        with self._pending_cv:
            now = p.outcomes.done() and not self._pending
            if not now:
                self._pending.append(p)
                self._pending_cv.notify_all()
        if now:
            self._record_batch(p)
        elif self._completer is None:
            self._completer = threading.Thread(target=self._complete_loop, name="strnet-results", daemon=True)
            self._completer.start()
        return len(jobs)

    def _complete_loop(self) -> None:
        """The completion thread: record each handed-over batch, in order, once it is screened."""
        while True:
            with self._pending_cv:
                while not self._pending and not self._abandon.is_set():
                    self._pending_cv.wait()
                if self._abandon.is_set():
                    return  # stop() gave up: what is pending stays leased
                p = self._pending[0]
            # a batch not back well within the lease (a decoder that never returns on some input):
            # kill the process; the batch fails for a retry and a new process takes the next
            deadline, killed = p.handed_off + 0.9 * self.settings.worker.lease_s, False
            while not p.outcomes.done() and not self._abandon.is_set():
                futures.wait([p.outcomes], timeout=0.2)
                if not killed and time.monotonic() > deadline:
                    log.error("screening_stuck", jobs=len(p.jobs), seconds=round(time.monotonic() - p.handed_off))
                    self.screening.kill()
                    killed = True
            if self._abandon.is_set():
                return
            try:
                self._record_batch(p)
            except StorageError as exc:  # the rest stays leased; the lease reaper hands it out again
                log.error("worker_database_error", error=str(exc))
            except Exception as exc:  # a bug must not stop recording for good
                log.exception("worker_crashed", error=exc.__class__.__name__)
            with self._pending_cv:
                self._pending.popleft()
                self._pending_cv.notify_all()

    def _record_batch(self, p: _Pending) -> None:
        """Turn a screened batch's outcomes into rows (each job its own commit)."""
        try:
            outcomes = p.outcomes.result()
        except (HelperDied, HelperClosed) as exc:
            if isinstance(exc, HelperClosed) or self._stop.is_set():
                # never run (closed for a model swap or a stop), or killed with the service:
                # back to the queue, no attempt counted
                for job in p.jobs:
                    store.release(self.db, job.job_id, self.owner)
                log.warning("worker_batch_released", jobs=len(p.jobs), reason=exc.__class__.__name__)
                return
            # a new screening process takes the retry; batch-mates are retried a little apart, so
            # an image that kills the process does not take the same images down with it again
            for n, job in enumerate(p.jobs):
                self._failed(job, f"{reason_of(exc)}; the image is screened again", extra_delay_s=2.0 * n)
            return
        except ProcessingError as exc:
            for job in p.jobs:
                self._failed(job, reason_of(exc))
            return
        except Exception as exc:  # a bug in the screening path: retried, then DEAD, never lost
            log.exception("screening_crashed", error=exc.__class__.__name__)
            for job in p.jobs:
                self._failed(job, f"screening failed ({exc.__class__.__name__})")
            return
        failpoints.hit("mid_inference")
        for outcome in outcomes:
            if isinstance(outcome, Finished):
                self._record(outcome)
            elif isinstance(outcome, Rejected):
                store.finish(self.db, outcome.job.job_id, self.owner, JobState.SKIPPED, outcome.reason)
                with self._stats_lock:
                    self.stats.skipped += 1
                log.info("job_skipped", job_id=outcome.job.job_id, reason=outcome.reason)
            elif isinstance(outcome, Failed):
                self._failed(outcome.job, outcome.error)

    def _record(self, o: Finished) -> None:
        """Write the overlay, then result, outbox rows and job DONE in one commit."""
        overlay_obj = None
        if o.overlay is not None:
            ov = o.overlay
            overlay_obj = write_object(self.results, "sc", ov.data, ov.sop_class_uid, ov.sop_instance_uid)
        failpoints.hit("results_built")
        ok = screening.record_screening(
            self.db,
            o.job.job_id,
            self.owner,
            o.findings,
            o.timings_ms,
            overlay_obj,
            self.destinations,
            self.settings.sender.send,
            node=self.scope.name or None,
        )
        if not ok:
            log.warning("job_lease_lost", job_id=o.job.job_id)
            return
        if overlay_obj is not None and self.on_outbox is not None:
            self.on_outbox()
        with self._stats_lock:
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
            ms=o.timings_ms,
        )

    def _failed(self, job: LeasedJob, error: str, extra_delay_s: float = 0.0) -> None:
        """``error``: a reason (``agent.errors.reason_of``), never an exception's raw text: it is
        the job's reason on the status page and in the ``job_failed`` log line."""
        with self._stats_lock:
            self.stats.failed += 1
        if job.attempts >= self.settings.worker.max_attempts:
            store.finish(self.db, job.job_id, self.owner, JobState.DEAD, f"failed {job.attempts} times: {error}")
            log.error("job_dead", job_id=job.job_id, error=error, attempts=job.attempts)
        else:
            store.fail(self.db, job.job_id, self.owner, RETRY_DELAY_S + extra_delay_s, error)
            log.warning("job_failed", job_id=job.job_id, error=error, attempt=job.attempts)
