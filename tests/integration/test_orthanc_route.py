"""A real Orthanc (the test PACS) routes a three-instance knee study to the agent.

One instance is JPEG 2000 lossless: Orthanc without its GDCM plugin cannot transcode it, so the
agent must accept it in its stored syntax. Everything is real: Orthanc on free ports with
temporary storage, the agent's SCP on loopback, the ``strnet`` CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dicom_factory as factory
import pydicom
import pytest
from conftest import AGENT_AET, agent_toml, require_tool
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from sqlalchemy import select

from agent.db.models import Instance
from agent.demo.orthanc import LocalOrthanc
from agent.domain import JobState
from agent.ingest.eligibility import LATERAL_REASON
from agent.queue.store import list_jobs

pytestmark = pytest.mark.integration

STRNET = str(Path(sys.executable).with_name("strnet"))


def knee_study(folder: Path) -> dict[str, pydicom.Dataset]:
    """Left AP, right AP (JPEG 2000 lossless) and left lateral, one study, files in ``folder``."""
    study = pydicom.uid.generate_uid()
    left_series, right_series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    left_ap = factory.knee_dx(study_uid=study, series_uid=left_series, laterality="L", seed=1)
    right_ap = factory.compressed(
        factory.knee_dx(study_uid=study, series_uid=right_series, laterality="R", seed=2), "j2k"
    )
    left_lat = factory.knee_dx(study_uid=study, series_uid=left_series, laterality="L", seed=3)
    left_lat.ViewPosition = "LL"
    left_lat.InstanceNumber = 2
    sent = {"left_ap": left_ap, "right_ap": right_ap, "left_lat": left_lat}
    for name, ds in sent.items():
        factory.write(ds, folder / f"{name}.dcm")
    return sent


def instance_rows(agent: Any) -> dict[str, Instance]:
    with agent.db.reading() as s:
        rows = s.execute(select(Instance)).scalars().all()
        for row in rows:
            s.expunge(row)
    return {row.sop_instance_uid: row for row in rows}


def test_orthanc_routes_a_knee_study_to_the_agent(make_agent: Any, tmp_path: Path) -> None:
    require_tool("Orthanc")
    agent = make_agent()
    sent = knee_study(tmp_path)
    assert sent["right_ap"].file_meta.TransferSyntaxUID == JPEG2000Lossless
    study_uid = str(sent["left_ap"].StudyInstanceUID)

    with LocalOrthanc(aet="ORTHANC") as pacs:
        reserved = (104, 4242, 8042, 11112)  # the shared machine's usual DICOM/HTTP listeners
        assert pacs.dicom_port not in reserved and pacs.http_port not in reserved
        pacs.add_modality("agent", AGENT_AET, "127.0.0.1", agent.scp.port)
        for name in sent:
            pacs.upload(tmp_path / f"{name}.dcm")
        stored = pacs.instances_of_study(study_uid)
        sent_uids = {str(d.SOPInstanceUID) for d in sent.values()}
        assert {i["SOPInstanceUID"] for i in stored} == sent_uids
        syntaxes = {i["SOPInstanceUID"]: i["TransferSyntaxUID"] for i in stored}
        assert syntaxes[str(sent["right_ap"].SOPInstanceUID)] == JPEG2000Lossless

        pacs.route_study(pacs.study_id_for(study_uid), "agent", synchronous=True)

    jobs = list_jobs(agent.db)
    assert len(jobs) == 3, [(j.sop_instance_uid, j.state, j.reason) for j in jobs]
    lateral = str(sent["left_lat"].SOPInstanceUID)  # kept, not screened (docs/dicom-values.md)
    assert {j.state for j in jobs if j.sop_instance_uid != lateral} == {JobState.QUEUED}
    [lat_job] = [j for j in jobs if j.sop_instance_uid == lateral]
    assert lat_job.state == JobState.SKIPPED and LATERAL_REASON in (lat_job.reason or "")
    assert {j.study_instance_uid for j in jobs} == {study_uid}
    assert {j.calling_ae for j in jobs} == {"ORTHANC"}
    assert {j.sop_instance_uid for j in jobs} == {str(d.SOPInstanceUID) for d in sent.values()}

    rows = instance_rows(agent)
    for name, ds in sent.items():
        row = rows[str(ds.SOPInstanceUID)]
        kept = pydicom.dcmread(agent.spool.path(row.spool_path))
        assert kept.SOPInstanceUID == ds.SOPInstanceUID, name
        assert kept.StudyInstanceUID == ds.StudyInstanceUID, name
        assert kept.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, name
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, name
        assert kept.PixelData == ds.PixelData, name  # encapsulated J2K arrives byte for byte
    j2k_row = rows[str(sent["right_ap"].SOPInstanceUID)]
    assert j2k_row.transfer_syntax_uid == JPEG2000Lossless
    assert rows[str(sent["left_ap"].SOPInstanceUID)].transfer_syntax_uid == ExplicitVRLittleEndian

    # the CLI, in its own process, reads the same database through a TOML file
    toml = tmp_path / "agent.toml"
    toml.write_text(agent_toml(agent.settings.data_dir), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRNET_")}
    out = subprocess.run(
        [STRNET, "jobs", "list", "--format", "json", "--config", str(toml)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    listed = json.loads(out.stdout)
    assert len(listed) == 3
    required = {
        "job_id", "sop_instance_uid", "study_instance_uid", "state", "reason", "received_at"
    }
    for item in listed:
        assert required <= item.keys()
        if item["sop_instance_uid"] == str(sent["left_lat"].SOPInstanceUID):
            assert item["state"] == "SKIPPED" and LATERAL_REASON in item["reason"]
        else:
            assert item["state"] == "QUEUED" and item["reason"] is None
        assert item["study_instance_uid"] == study_uid
    assert {i["sop_instance_uid"] for i in listed} == {str(d.SOPInstanceUID) for d in sent.values()}
    assert {i["job_id"] for i in listed} == {j.job_id for j in jobs}
