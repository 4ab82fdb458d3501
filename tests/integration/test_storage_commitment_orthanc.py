"""Storage commitment on results against a real Orthanc (1.10, the Debian package).

Orthanc is the Storage Commitment SCP: it answers the agent's N-ACTION on the association that
stored the results, then opens an association of its own to the modality it knows for the agent's
AE title (DicomModalities, AllowStorageCommitment, true by default) and sends the N-EVENT-REPORT
there, proposing itself as SCP by SCP/SCU role selection. A modality declared with
``"AllowStorageCommitment": false`` has its N-ACTION refused: Orthanc ends the association
without an answer. Scripted peers (same association, failures, no report):
tests/loopback/test_storage_commitment.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import dicom_factory as factory
import pytest
from conftest import AGENT_AET, TEST_SCU_AET, agent_toml, free_port, require_tool
from pydicom.uid import generate_uid
from sqlalchemy import select

from agent.db.models import Study
from agent.demo.orthanc import LocalOrthanc
from agent.domain import Eligibility, IncomingInstance, InstanceRef, OutboxState
from agent.pacs.sender import Sender
from agent.queue import outbox, store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STRNET = str(Path(sys.executable).with_name("strnet"))


def wait_for(cond: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not met within {timeout_s:.0f} s")


def orthanc(agent_port: int, tmp_path: Path, allow_commitment: bool = True) -> LocalOrthanc:
    require_tool("Orthanc")
    agent = {"AET": AGENT_AET, "Host": "127.0.0.1", "Port": agent_port, "AllowStorageCommitment": allow_commitment}
    pacs = LocalOrthanc("ORTHANC", extra_config={"DicomModalities": {"agent": agent}}, work_dir=tmp_path / "orthanc")
    return pacs.start()


def destination(pacs: LocalOrthanc) -> dict[str, Any]:
    return {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
            "storage_commitment": True, "storage_commitment_timeout_s": 60}  # fmt: skip


def outbox_list_json(data_dir: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """What an operator sees: `strnet outbox list --format json` over the agent's database."""
    config = tmp_path / "cli.toml"
    config.write_text(agent_toml(data_dir, 'log_format = "json"\n'), encoding="utf-8")
    out = subprocess.run([STRNET, "outbox", "list", "--format", "json", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert isinstance(rows, list)
    return rows


def test_results_sent_to_orthanc_all_end_committed(
    make_agent: Any, tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = generate_uid()
    files, sources = [], set()
    for side in ("L", "R"):
        ds = factory.knee_dx(study_uid=study, laterality=side, rows=320, cols=256, seed=len(files), patient_id="PAT-SC")
        files.append(factory.write(ds, tmp_path / f"{side}.dcm"))
        sources.add(str(ds.SOPInstanceUID))
    agent_port = free_port()
    pacs = orthanc(agent_port, tmp_path)
    caplog.set_level(logging.INFO, logger="agent.pacs.commitment")
    try:
        agent = make_agent(
            scp={"port": agent_port},
            worker={"enabled": True, "weights": str(tiny_weights), "device": "cpu", "max_wait_ms": 20},
            reporting={"quiet_period_s": 1.0},
            sender={"poll_s": 0.2, "keep_open_s": 1.0, "backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 5},
            pacs=[destination(pacs)],
        )
        for f in files:
            pacs.upload(f)
        pacs.route_study(pacs.study_id_for(study), "agent", synchronous=True)
        wait_for(
            lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.COMMITTED.value] * 3,
            timeout_s=120,
            what="the SR and both overlays committed",
        )
        rows = outbox_list_json(agent.settings.data_dir, tmp_path)
        assert sorted(r["kind"] for r in rows) == ["sc", "sc", "sr"]
        for r in rows:
            assert (r["destination"], r["state"], r["attempts"], r["last_error"]) == ("orthanc", "COMMITTED", 1, None)
            assert r["commitment_uid"] and r["delivered_at"].endswith("Z") and r["created_at"].endswith("Z")
        results = {i["SOPInstanceUID"] for i in pacs.instances_of_study(study)} - sources
        assert {r["sop_instance_uid"] for r in rows} == results  # what was committed is in Orthanc, once
        # Orthanc reported on an association it opened to the agent's listener, not on ours
        logged = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
        reports = [m for m in logged if m.get("event") == "commitment_reported"]
        assert reports and all(m["reporter"] == "ORTHANC" and m["same_association"] is False for m in reports), reports
        assert sum(m["committed"] for m in reports) == 3
    finally:
        pacs.stop()


def test_orthanc_refusing_storage_commitment_is_retried_then_dead(make_agent: Any, tmp_path: Path) -> None:
    agent_port = free_port()
    pacs = orthanc(agent_port, tmp_path, allow_commitment=False)
    sender = None
    try:
        agent = make_agent(
            scp={"port": agent_port},
            sender={"poll_s": 0.1, "keep_open_s": 0.3, "backoff_base_s": 0.2, "backoff_max_s": 0.4, "timeout_s": 5,
                    "max_attempts": 2, "connections": 1},  # fmt: skip
            pacs=[destination(pacs)],
        )
        ref = InstanceRef("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.1", "1.2.3.999", "1.2.3.998", "1.2.840.10008.1.2.1")
        store.record_instance(agent.db, IncomingInstance(ref, "d/1.dcm", "0" * 64, 10, TEST_SCU_AET, "127.0.0.1",
                                                         Eligibility(True, None)))  # fmt: skip
        ds = factory.knee_dx(rows=32, cols=32)
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with agent.db.transaction() as s:
            study_id = s.execute(select(Study.id)).scalar_one()
            obj = outbox.write_object(agent.results, "sc", buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            outbox.add(s, study_id, obj, ["orthanc"], send=True)
        sender = Sender(agent.db, agent.results, agent.settings.pacs, agent.settings.sender, AGENT_AET)
        sender.start()
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DEAD.value], what="dead")
        (row,) = outbox_list_json(agent.settings.data_dir, tmp_path)
        assert row["attempts"] == 2 and row["state"] == "DEAD"
        assert row["last_error"] == (
            "gave up after 2 attempts: stored, but the storage commitment request (N-ACTION) got no answer"
        )
        assert "Rejected N-ACTION request" in pacs.log_path.read_text(errors="replace")
        assert [i["SOPInstanceUID"] for i in pacs.instances_of_study(str(ds.StudyInstanceUID))] == [
            str(ds.SOPInstanceUID)  # stored (twice: one copy), never committed
        ]
    finally:
        if sender is not None:
            sender.stop(timeout_s=10)
        pacs.stop()
