"""Build and encode study SRs and image overlays, in a helper process when configured
(``reporting.build_processes``).

highdicom builds in pure Python: about 240 ms of interpreter time per three-image study SR and
85 ms per overlay (render, build, encode), time during which no other thread of ``strnet serve``
(C-STORE receive, worker, sender) can run Python. In a helper process that work runs on the other
core: the sweep thread only waits for the SR's bytes, and the worker hands each overlay over
(``submit_overlay`` returns a Future) and screens the next batch while it is built. The helper is
started with ``spawn`` (never ``fork``: the parent runs threads), dies with its parent (Linux
``PR_SET_PDEATHSIG``), ignores Ctrl-C (the parent stops it), and is replaced when it dies. Inputs
are headers (never the source's pixel data), findings and, for an overlay, the decoded image;
outputs are the encoded objects with their UIDs.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from agent.errors import ProcessingError
from agent.logging import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_PIXEL_GROUP = 0x7FE00000  # (7FE0,xxxx): pixel data; everything an overlay reads comes before it

T = TypeVar("T")


@dataclass(frozen=True)
class BuiltSr:
    """An encoded SR and the identifiers the outbox and the report row need."""

    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class BuiltOverlay:
    """An encoded overlay (secondary capture) and the identifiers the outbox needs."""

    data: bytes
    sop_class_uid: str
    sop_instance_uid: str


def encode(ds: Any) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build_sr_bytes(sources: list[Any], findings: list[Any], revision: int, predecessor: Any) -> BuiltSr:
    """Build and encode one study's SR (runs in the helper process or in the caller)."""
    from agent.reporting.sr import build_sr

    sr = build_sr(sources, findings, revision=revision, predecessor=predecessor)
    return BuiltSr(encode(sr), str(sr.SOPClassUID), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID))


def build_overlay_bytes(source: Any, image: Any, finding: Any, instance_number: int) -> BuiltOverlay:
    """Build and encode one image's overlay (runs in the helper process or in the caller)."""
    from agent.reporting.overlay import build_overlay

    sc = build_overlay(source, image, finding, instance_number=instance_number)
    return BuiltOverlay(encode(sc), str(sc.SOPClassUID), str(sc.SOPInstanceUID))


def header(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data (a new dataset; raw elements and encoding kept, nothing decoded),
    so a 10 MB source is not pickled to the helper."""
    return ds[:_PIXEL_GROUP]


def _warm_up(source: Any, image: Any, findings: list[Any]) -> None:
    build_overlay_bytes(source, image, findings[0], 1)
    build_sr_bytes([source], findings[:1], 1, None)


def _done(fn: Any, *args: Any) -> Future[Any]:
    """``fn(*args)`` run now, as a completed Future (the inline mode)."""
    future: Future[Any] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - handed to whoever reads the future, as the helper does
        future.set_exception(exc)
    return future


def _helper_died(exc: BaseException) -> ProcessingError:
    err = ProcessingError("the overlay helper process died; the image is screened again")
    err.__cause__ = exc
    return err


def _helper_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # die with the parent, even when it is killed with SIGKILL
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own pipe closing still ends the helper
    # pay highdicom's, PIL's and the font's imports here, not at the first study
    import agent.reporting.overlay  # noqa: F401
    import agent.reporting.sr  # noqa: F401


class ReportBuilder:
    """Builds SRs and overlays in ``processes`` helper processes (0: in the calling thread).

    Thread-safe: the study sweep (SRs) and the worker (overlays) share the helpers.
    """

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:  # never start a helper that nobody would stop
                raise ProcessingError("report helper closed")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_helper_init,
                )
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor, exc: BaseException) -> None:
        """Forget a pool whose helper died (once, whoever notices first); the next build starts one."""
        with self._lock:
            if self._pool is not pool:
                return
            self._pool = None
        log.error("report_helper_died", error=exc.__class__.__name__)
        pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, fn: Any, *args: Any) -> tuple[ProcessPoolExecutor, Future[Any]]:
        pool = self._executor()
        try:
            return pool, pool.submit(fn, *args)
        except BrokenProcessPool as exc:  # died since the last build: the next call gets a new one
            self._discard(pool, exc)
            raise

    def build_sr(self, sources: list[Any], findings: list[Any], revision: int, predecessor: Any) -> BuiltSr:
        """Raises what ``build_sr`` raises (ValueError, TypeError), or ProcessingError when the
        helper process died (it is replaced for the next call)."""
        if self.processes <= 0:
            return build_sr_bytes(sources, findings, revision, predecessor)
        try:
            pool, future = self._submit(build_sr_bytes, sources, findings, revision, predecessor)
        except BrokenProcessPool as exc:
            raise ProcessingError("the SR helper process died; the study is reported again at the next sweep") from exc
        except RuntimeError as exc:  # closed while a sweep was still running (shutting down)
            raise ProcessingError(f"SR helper unavailable: {exc}") from exc
        try:
            return future.result()  # type: ignore[no-any-return]
        except BrokenProcessPool as exc:
            self._discard(pool, exc)
            raise ProcessingError("the SR helper process died; the study is reported again at the next sweep") from exc
        except CancelledError as exc:  # closed while a sweep was still running (shutting down)
            raise ProcessingError("SR helper closed before the build") from exc

    def submit_overlay(self, source: Dataset, image: Any, finding: Any, instance_number: int) -> Future[BuiltOverlay]:
        """Start building one image's overlay; returns at once (inline: once it is built).

        The Future raises what ``build_overlay`` raises (ValueError, TypeError), or ProcessingError
        when the helper process died (it is replaced for the next call) or the builder is closed.
        Its bytes are those of an inline build of the same inputs (highdicom's creation
        timestamps aside).
        """
        if self.processes <= 0:
            return _done(build_overlay_bytes, source, image, finding, instance_number)
        out: Future[BuiltOverlay] = Future()
        try:
            pool, inner = self._submit(build_overlay_bytes, header(source), image, finding, instance_number)
        except BrokenProcessPool as exc:
            out.set_exception(_helper_died(exc))
            return out
        except (RuntimeError, ProcessingError) as exc:  # closed (shutting down)
            out.set_exception(ProcessingError(f"overlay helper unavailable: {exc}"))
            return out
        inner.add_done_callback(partial(self._relay, pool, out))
        return out

    def _relay(self, pool: ProcessPoolExecutor, out: Future[BuiltOverlay], inner: Future[BuiltOverlay]) -> None:
        # Runs in the pool's management thread: hand the outcome on, nothing slow here.
        if inner.cancelled():
            out.set_exception(ProcessingError("overlay helper closed before the build"))
            return
        exc = inner.exception()
        if isinstance(exc, BrokenProcessPool):
            self._discard(pool, exc)
            out.set_exception(_helper_died(exc))
        elif exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(inner.result())

    def warm_up(self, source: Any, image: Any, findings: list[Any]) -> None:
        """Start the helper and build a throw-away overlay and SR in it, without waiting (its
        imports take a few seconds); inline, build them now. Failures are logged, never raised."""

        def done(future: Future[Any]) -> None:
            if future.exception() is not None:
                log.warning("report_helper_warm_up_failed", error=future.exception().__class__.__name__)

        try:
            if self.processes <= 0:
                _warm_up(source, image, findings)
            else:
                self._submit(_warm_up, source, image, findings)[1].add_done_callback(done)
        except Exception as exc:  # noqa: BLE001 - the real builds report their own errors
            log.warning("report_helper_warm_up_failed", error=exc.__class__.__name__)

    def close(self, wait: bool = True) -> None:
        """Stop the helpers; builds not started are cancelled. ``wait=False``: do not wait for the
        one running (the helper exits after it, or with this process)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
