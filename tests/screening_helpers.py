"""Helpers shared by the screening tests: send a study to an agent, make studies, wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conftest import AGENT_AET, TEST_SCU_AET
from dicom_factory import DX_PRESENTATION, knee_dx
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from agent.app import Agent
from agent.pacs import status


def send_study(agent: Agent, datasets: list[Any]) -> None:
    ae = AE(ae_title=TEST_SCU_AET)
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", agent.scp.port, ae_title=AGENT_AET)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert int(assoc.send_c_store(ds).Status) == status.SUCCESS
    finally:
        assoc.release()


def bilateral_study(n_views: int = 2) -> list[Any]:
    study = generate_uid()
    out = []
    for side in ("L", "R"):
        series = generate_uid()
        for _ in range(n_views):
            out.append(knee_dx(study_uid=study, series_uid=series, laterality=side, seed=len(out), rows=320, cols=256))
    return out


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")
