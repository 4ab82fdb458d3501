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
from study_routing import study_agent

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


@pytest.mark.integration
def test_orthanc_routes_each_study_whole_to_the_agent_its_uid_picks(make_agent: Any, tmp_path: Path) -> None:
    require_tool("Orthanc")
    agents = [make_agent(scp={"ae_title": "STRNET"}, worker={"enabled": False}) for _ in range(2)]
    script = ROOT / "deploy" / "orthanc" / "route-knees-by-study.lua"
    studies = [f"1.2.826.0.1.3680043.8.498.{7000 + i}" for i in range(8)]
    assert {study_agent(uid, 2) for uid in studies} == {0, 1}  # both agents get studies
    with LocalOrthanc(
        "ORTHANC",
        modalities={f"strnet{i + 1}": ("STRNET", "127.0.0.1", a.scp.port) for i, a in enumerate(agents)},
        extra_config={"LuaScripts": [str(script)]},
    ) as orthanc:
        sent: dict[str, set[str]] = {}
        for n, uid in enumerate(studies):
            for view in range(2):
                ds = knee_dx(study_uid=uid, seed=n * 2 + view)
                sent.setdefault(uid, set()).add(str(ds.SOPInstanceUID))
                orthanc.upload(write(ds, tmp_path / f"{n}-{view}.dcm"))
        orthanc.upload(write(knee_dx(body_part="CHEST"), tmp_path / "chest.dcm"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(len(list_jobs(a.db)) for a in agents) < 2 * len(studies):
            time.sleep(0.2)
        time.sleep(1.0)  # a wrongly routed film (the chest, a second copy) would arrive meanwhile
        for i, agent in enumerate(agents):
            got: dict[str, set[str]] = {}
            for job in list_jobs(agent.db):
                got.setdefault(job.study_instance_uid, set()).add(job.sop_instance_uid)
            assert got == {uid: sent[uid] for uid in studies if study_agent(uid, 2) == i}
