"""Build and encode study SRs (in a helper process when configured: ``reporting.build_processes``)
and image overlays (wherever the image is screened: the screening process, or the worker thread).

highdicom builds in pure Python: about 240 ms of interpreter time per three-image study SR,
time during which no other thread of ``strnet serve`` (C-STORE receive, recording, sending) can
run Python. In a helper process (agent/helper.py) it runs on the other core and the sweep thread
only waits for the SR's bytes. Inputs are the sources' headers and the findings; outputs are the
encoded objects with their UIDs.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from agent.errors import BuildError, HelperDied, ProcessingError, reason_of
from agent.helper import HelperProcess
from agent.logging import get_logger

log = get_logger(__name__)


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


#: what building or encoding a result raises on inputs it cannot use (highdicom and pydicom
#: quote the offending value in the message: it never leaves here as it is)
_BUILD_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def build_sr_bytes(
    sources: list[Any], findings: list[Any], revision: int, predecessor: Any, knees: list[Any] | None = None
) -> BuiltSr:
    """Build and encode one study's SR (runs in the SR helper process or in the caller), with
    the study's knees (agent/pipeline/knees.py) in its summary when given.

    Raises BuildError (a ProcessingError and a ValueError) whose message names no element value."""
    from agent.reporting.sr import build_sr

    try:
        sr = build_sr(sources, findings, revision=revision, predecessor=predecessor, knees=knees)
        data = encode(sr)
    except _BUILD_ERRORS as exc:
        raise BuildError(f"SR could not be built: {reason_of(exc)}") from None
    return BuiltSr(data, str(sr.SOPClassUID), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID))


def build_overlay_bytes(source: Any, image: Any, finding: Any, instance_number: int) -> BuiltOverlay:
    """Build and encode one image's overlay (where the image was screened).

    Raises BuildError (a ProcessingError and a ValueError) whose message names no element value."""
    from agent.reporting.overlay import build_overlay

    try:
        sc = build_overlay(source, image, finding, instance_number=instance_number)
        data = encode(sc)
    except _BUILD_ERRORS as exc:
        raise BuildError(f"overlay could not be built: {reason_of(exc)}") from None
    return BuiltOverlay(data, str(sc.SOPClassUID), str(sc.SOPInstanceUID))


def blank_source() -> Any:
    """A minimal knee DX header for the warm-ups (never stored, never sent)."""
    from pydicom.dataset import Dataset
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


def _warm_up(source: Any, findings: list[Any]) -> None:
    build_sr_bytes([source], findings[:1], 1, None)


def _setup() -> None:
    # pay highdicom's imports here, not at the first study
    import agent.reporting.sr  # noqa: F401


class ReportBuilder:
    """Builds study SRs in ``processes`` helper processes (0: in the calling thread)."""

    def __init__(self, processes: int, timeout_s: float = 120.0) -> None:
        self.processes = processes
        self.timeout_s = timeout_s  # reporting.build_timeout_s
        self.helper = HelperProcess("SR", processes, _setup) if processes > 0 else None

    def build_sr(
        self, sources: list[Any], findings: list[Any], revision: int, predecessor: Any, knees: list[Any] | None = None
    ) -> BuiltSr:
        """Raises BuildError (a ProcessingError and a ValueError, its message naming no element
        value) when the SR cannot be built, or ProcessingError when the helper process died (it
        is replaced for the next call) or is closed."""
        if self.helper is None:
            return build_sr_bytes(sources, findings, revision, predecessor, knees)
        future = self.helper.submit(build_sr_bytes, sources, findings, revision, predecessor, knees)
        try:
            return future.result(timeout=self.timeout_s)
        except HelperDied as exc:
            raise ProcessingError("the SR helper process died") from exc
        except FutureTimeout:
            self.helper.kill()  # the stuck build ends with its helper; the next call starts a new one
            raise ProcessingError("the SR build took longer than reporting.build_timeout_s") from None

    def warm_up(self, source: Any, findings: list[Any]) -> None:
        """Start the helper and build a throw-away SR in it, without waiting (its imports take a
        few seconds); inline, build it now. Failures are logged, never raised."""

        def done(future: Future[Any]) -> None:
            if future.exception() is not None:
                log.warning("report_helper_warm_up_failed", error=future.exception().__class__.__name__)

        try:
            if self.helper is None:
                _warm_up(source, findings)
            else:
                self.helper.submit(_warm_up, source, findings).add_done_callback(done)
        except Exception as exc:  # noqa: BLE001 - the real builds report their own errors
            log.warning("report_helper_warm_up_failed", error=exc.__class__.__name__)

    def close(self, wait: bool = True) -> None:
        """Stop the helper; builds not started are cancelled. ``wait=False``: do not wait for the
        one running (the helper exits after it, or with this process)."""
        if self.helper is not None:
            self.helper.close(wait)
