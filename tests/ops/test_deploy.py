"""Deployment files: the systemd unit verifies, and Orthanc's auto-routing script routes knees."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from dicom_factory import knee_dx, write
from pydicom import dcmread

from agent.demo.orthanc import LocalOrthanc
from agent.queue.store import list_jobs

ROOT = Path(__file__).parents[2]


def test_systemd_unit_verifies() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not on this machine")
    unit = ROOT / "deploy" / "systemd" / "strnet-agent.service"
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


@pytest.mark.integration
def test_orthanc_lua_script_routes_knees_and_not_other_films(make_agent: Any, tmp_path: Path) -> None:
    require_tool("Orthanc")
    agent = make_agent(scp={"ae_title": "STRNET"})
    script = ROOT / "deploy" / "orthanc" / "route-knees.lua"
    with LocalOrthanc(
        "ORTHANC",
        modalities={"strnet": ("STRNET", "127.0.0.1", agent.scp.port)},
        extra_config={"LuaScripts": [str(script)]},
    ) as orthanc:
        knee = write(knee_dx(), tmp_path / "knee.dcm")
        chest = write(knee_dx(body_part="CHEST"), tmp_path / "chest.dcm")
        orthanc.upload(chest)
        orthanc.upload(knee)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list_jobs(agent.db):
            time.sleep(0.2)
        time.sleep(1.0)  # give a wrongly routed chest film the time to arrive too
        jobs = list_jobs(agent.db)
        assert [j.sop_instance_uid for j in jobs] == [str(dcmread(knee).SOPInstanceUID)]
