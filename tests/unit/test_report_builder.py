"""agent/reporting/builder.py: SRs built in a real helper process (spawned), the helper's death,
and the inline mode. What the SR and the overlay contain is tested in test_reporting.py; overlays
built in the screening process in test_worker_screening.py; the helper itself in test_helper.py."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import knee_dx
from pydicom.uid import generate_uid
from test_reporting import _findings

from agent.errors import ProcessingError
from agent.reporting.builder import ReportBuilder, build_sr_bytes


def _inputs() -> tuple[list[pydicom.Dataset], list[Any]]:
    study = generate_uid()
    sources = [knee_dx(study_uid=study, laterality=side, seed=i, rows=40, cols=32) for i, side in enumerate("LR")]
    for ds in sources:
        del ds.PixelData  # the sweep reads headers only
    # as the sweep rebuilds them from the database: no saliency map
    findings = [dataclasses.replace(f, saliency=None) for f in _findings(np.random.default_rng(1))[:2]]
    return sources, findings


def _content(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(BytesIO(data))
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.ContentSequence)


def test_helper_process_builds_the_same_sr_as_the_caller() -> None:
    sources, findings = _inputs()
    builder = ReportBuilder(processes=1)
    try:
        built = builder.build_sr(sources, findings, 1, None)
        [helper_pid] = builder.helper.pids()  # type: ignore[union-attr]
    finally:
        builder.close()
    inline = build_sr_bytes(sources, findings, 1, None)
    assert helper_pid != os.getpid()
    assert _content(built.data) == _content(inline.data)
    assert (built.sop_instance_uid, built.series_instance_uid) == (inline.sop_instance_uid, inline.series_instance_uid)


def test_a_dead_helper_is_a_processing_error_and_is_replaced() -> None:
    sources, findings = _inputs()
    builder = ReportBuilder(processes=1)
    try:
        builder.build_sr(sources, findings, 1, None)
        for pid in builder.helper.pids():  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(ProcessingError):
            builder.build_sr(sources, findings, 1, None)
        assert builder.build_sr(sources, findings, 1, None).data  # a new helper
    finally:
        builder.close()


def test_a_stuck_build_is_stopped_after_the_timeout_and_its_helper_killed() -> None:
    """One stuck build held up every later SR (the sweep waited on it for ever). The helper here
    is a stand-in whose call never ends; killing a real helper is test_a_dead_helper_... above."""
    from concurrent.futures import Future

    class StuckHelper:
        killed = 0

        def submit(self, *_args: object) -> Future[object]:
            return Future()  # never completes

        def kill(self) -> None:
            self.killed += 1

    sources, findings = _inputs()
    builder = ReportBuilder(processes=0, timeout_s=0.5)
    builder.helper = StuckHelper()  # type: ignore[assignment]
    t0 = time.monotonic()
    with pytest.raises(ProcessingError, match="build_timeout_s"):
        builder.build_sr(sources, findings, 1, None)
    assert 0.4 < time.monotonic() - t0 < 10 and builder.helper.killed == 1  # type: ignore[attr-defined]


def test_zero_processes_builds_in_the_caller_and_errors_pass_through() -> None:
    sources, findings = _inputs()
    builder = ReportBuilder(processes=0)
    assert builder.build_sr(sources, findings, 1, None).data
    with pytest.raises(ValueError):
        builder.build_sr(sources, findings[:1], 1, None)  # 2 sources, 1 finding
    assert builder.helper is None


# highdicom stamps the time of the build: the only bytes two builds of the same inputs differ in
_STAMPS = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
           "DateOfSecondaryCapture", "TimeOfSecondaryCapture", "ContributionDateTime"}  # fmt: skip


def _unstamped(data: bytes) -> bytes:
    stamps = [e for e in pydicom.dcmread(BytesIO(data)).iterall() if e.keyword in _STAMPS]
    assert {e.keyword for e in stamps} == _STAMPS
    for value in sorted({str(e.value).encode() for e in stamps}, key=len, reverse=True):  # datetimes first
        data = data.replace(value, b"*" * len(value))
    return data
