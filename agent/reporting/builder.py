"""Build and encode study SRs, in a helper process when configured (``reporting.build_processes``).

highdicom builds an SR in pure Python: about 240 ms of interpreter time per three-image study
(build and encode), time during which no other thread of ``strnet serve`` (C-STORE receive,
worker, sender) can run Python. In a helper process the sweep thread only waits for the bytes
and the build runs on the other core. The helper is started with ``spawn`` (never ``fork``: the
parent runs threads), dies with its parent (Linux ``PR_SET_PDEATHSIG``), ignores Ctrl-C (the
parent stops it), and is replaced when it dies. Inputs and outputs are small: the sources'
headers, the findings, and the encoded SR (tens of kB).
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from agent.errors import ProcessingError
from agent.logging import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class BuiltSr:
    """An encoded SR and the identifiers the outbox and the report row need."""

    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


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


def _helper_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # die with the parent, even when it is killed with SIGKILL
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own pipe closing still ends the helper
    import agent.reporting.sr  # noqa: F401 - pay highdicom's import here, not at the first study


class ReportBuilder:
    """Builds SRs in ``processes`` helper processes (0: in the calling thread)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_helper_init,
            )
        return self._pool

    def build_sr(self, sources: list[Any], findings: list[Any], revision: int, predecessor: Any) -> BuiltSr:
        """Raises what ``build_sr`` raises (ValueError, TypeError), or ProcessingError when the
        helper process died (it is replaced for the next call)."""
        if self.processes <= 0:
            return build_sr_bytes(sources, findings, revision, predecessor)
        pool = self._executor()
        try:
            return pool.submit(build_sr_bytes, sources, findings, revision, predecessor).result()
        except BrokenProcessPool as exc:
            log.error("report_helper_died", error=exc.__class__.__name__)
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise ProcessingError("the SR helper process died; the study is reported again at the next sweep") from exc
        except RuntimeError as exc:  # closed while a sweep was still running (shutting down)
            raise ProcessingError(f"SR helper unavailable: {exc}") from exc

    def warm_up(self, sources: list[Any], findings: list[Any]) -> None:
        """Start the helper and build one throw-away SR in it, without waiting (its imports take
        a few seconds); inline, build it now. Failures are logged, never raised."""

        def done(future: Any) -> None:
            if future.exception() is not None:
                log.warning("report_helper_warm_up_failed", error=future.exception().__class__.__name__)

        try:
            if self.processes <= 0:
                build_sr_bytes(sources, findings, 1, None)
            else:
                self._executor().submit(build_sr_bytes, sources, findings, 1, None).add_done_callback(done)
        except Exception as exc:  # noqa: BLE001 - the real builds report their own errors
            log.warning("report_helper_warm_up_failed", error=exc.__class__.__name__)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
