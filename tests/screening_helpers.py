"""Helpers shared by the screening tests: send a study to an agent, make studies, wait."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from conftest import AGENT_AET, TEST_SCU_AET
from dicom_factory import DX_PRESENTATION, knee_dx
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from agent.app import Agent
from agent.domain import AlgorithmInfo, Eligibility, Findings, IncomingInstance, InstanceRef
from agent.pacs import status
from agent.queue import screening, store
from agent.reporting.builder import encode


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


def screened(reporter: Any, study_uid: str | None = None, name: str = "Quimbly^Ottoline", pid: str = "PID-42") -> str:
    """One knee film spooled, received and screened positive, as the C-STORE handler and the worker
    leave it; returns its study's UID."""
    study_uid = study_uid or generate_uid()
    ds = knee_dx(study_uid=study_uid, rows=40, cols=32, patient_name=name, patient_id=pid)
    data = encode(ds)
    rel = reporter.spool.write_named(f"{ds.SOPInstanceUID}.dcm", [data])
    ref = InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), study_uid, str(ds.SeriesInstanceUID),
                      str(ds.file_meta.TransferSyntaxUID))  # fmt: skip
    store.record_instance(
        reporter.db,
        IncomingInstance(ref, rel, hashlib.sha256(data).hexdigest(), len(data), "TESTSCU", "127.0.0.1",
                         Eligibility(True), patient_id=pid, patient_name=name),
    )  # fmt: skip
    (job,) = store.lease(reporter.db, "test-worker", 1, 60.0)
    algorithm = AlgorithmInfo("STR-Net", "test-1", "0" * 64)
    findings = Findings(0.81, 0.4, True, 0.6, "osteopenia", -1.8, -2.5, -1.1, 0.9, algorithm)
    assert screening.record_screening(reporter.db, job.job_id, "test-worker", findings, {}, None, [], send=False)
    return study_uid


def report_study(db: Any, study_instance_uid: str, served: Any = None) -> bool:
    """The SR's commit of a study whose films are screened, as the reporter makes it but without
    building the SR (a records-level stand-in: no spool files needed): the study's knees from the
    instances' recorded laterality (what the reporter reads from the same headers), the knee rows
    and the flag. Returns what ``screening.record_report`` returns."""
    from agent.db.models import Instance, Result, Study
    from agent.domain import ServedModel
    from agent.pipeline.knees import study_knees
    from agent.queue.outbox import OutgoingObject

    served = served or ServedModel(AlgorithmInfo("STR-Net", "test", "0" * 64), 0.4, {}, 0.9, "cpu")
    with db.reading() as s:
        study_id = s.query(Study.id).filter(Study.study_instance_uid == study_instance_uid).scalar()
        rows = (
            s.query(Result, Instance.laterality)
            .join(Instance, Instance.id == Result.instance_id)
            .filter(Result.study_id == study_id)
            .order_by(Instance.id)
            .all()
        )
        findings = [screening.findings_of(r, served) for r, _ in rows]
        result_ids = [r.id for r, _ in rows]
        sides = [side for _, side in rows]
    (ready,) = screening.ready_studies(db, 0.0, study_id=study_id)
    sr_uid = generate_uid()
    return screening.record_report(
        db, ready, OutgoingObject("sr", "1.2.840.10008.5.1.4.1.1.88.34", sr_uid, f"results/{sr_uid}.dcm"),
        generate_uid(), [], send=False, knees=study_knees(sides, findings), result_ids=result_ids,
    )  # fmt: skip
