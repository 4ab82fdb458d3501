"""Issue 21 acceptance: an Orthanc-routed run reaches the EHR. A real Orthanc routes three knee
studies (three patients) to the agent (in-process, tiny STR-Net: the plumbing, not the accuracy,
is under test); the agent sends SRs back to Orthanc and, for each screened study, one ORU^R01 to a
real MLLP listener (python-hl7's server; parsed back by python-hl7, not by our builder) and one
transaction Bundle to a real FHIR server (Medplum's router and in-memory repository; what it
stored is checked by Medplum's validator)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dicom_factory as factory
import hl7
import pytest
from conftest import AGENT_AET, free_port, require_tool
from fhir_server.medplum import MedplumServer
from mllp_listener import Listener
from screening_helpers import wait_for

from agent.demo.orthanc import LocalOrthanc
from agent.domain import OutboxState
from agent.queue import outbox

pytestmark = [pytest.mark.integration]

PATIENTS = ("EHR-P1", "EHR-P2", "EHR-P3")


@pytest.fixture()
def listener() -> Iterator[Listener]:
    lst = Listener().start()
    yield lst
    lst.stop()


@pytest.fixture()
def fhir(tmp_path: Path) -> Iterator[MedplumServer]:
    server = MedplumServer(tmp_path)
    yield server
    server.stop()


def test_each_routed_study_gets_one_oru_and_one_bundle(
    make_agent: Any, tiny_weights: Path, tmp_path: Path, listener: Listener, fhir: MedplumServer
) -> None:
    require_tool("Orthanc")
    port = free_port()
    with LocalOrthanc("ORTHANC", modalities={"agent": (AGENT_AET, "127.0.0.1", port)},
                      work_dir=tmp_path / "orthanc") as orthanc:  # fmt: skip
        agent = make_agent(
            scp={"port": port},
            worker={"enabled": True, "weights": str(tiny_weights), "device": "cpu", "max_wait_ms": 20},
            reporting={"quiet_period_s": 1.0, "overlay": False},
            sender={"poll_s": 0.2, "backoff_base_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 10},
            pacs=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
            hl7=[{"name": "ehr-hl7", "host": "127.0.0.1", "port": listener.port, "receiving_application": "EHR"}],
            fhir=[{"name": "ehr-fhir", "base_url": fhir.base_url, "referral": "service-request"}],
        )
        studies: dict[str, Any] = {}
        for n, patient in enumerate(PATIENTS):
            files = []
            for side in ("L", "R"):
                ds = factory.knee_dx(laterality=side, seed=10 * n + len(files), rows=320, cols=256,
                                     patient_id=patient, patient_name=f"TEST^{patient}",
                                     study_uid=studies.get(patient, (None,))[0])  # fmt: skip
                ds.AccessionNumber = f"ACC-{n}"
                studies[patient] = (str(ds.StudyInstanceUID), f"ACC-{n}")
                files.append(factory.write(ds, tmp_path / f"{patient}-{side}.dcm"))
            for f in files:
                orthanc.upload(f)
        for uid, _ in studies.values():
            orthanc.route_study(orthanc.study_id_for(uid), "agent", synchronous=True)
        messages = lambda: [o for o in outbox.items(agent.db) if o.kind in ("hl7", "fhir")]  # noqa: E731
        wait_for(lambda: len(messages()) == 6 and {o.state for o in messages()} == {OutboxState.DELIVERED.value},
                 timeout_s=180)  # fmt: skip
    # HL7: one ORU^R01 per study, read by an independent parser
    assert len(listener.received) == 3
    seen = {}
    for raw in listener.received:
        msg = hl7.parse(str(raw))
        assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
        seen[str(msg.segment("PID")[3]).split("^")[0]] = msg
    assert set(seen) == set(PATIENTS)
    for patient, (uid, accession) in studies.items():
        msg = seen[patient]
        assert str(msg.segment("OBR")[3]).split("^")[0] == accession and str(msg.segment("OBR")[25]) == "P"
        assert uid in str(msg)
        assert any(str(s[11]) == "P" for s in msg.segments("OBX"))
        assert "NOT FOR DIAGNOSTIC USE" in str(msg.segment("NTE"))
    # FHIR: one preliminary DiagnosticReport per study, every stored resource valid
    reports = fhir.search("DiagnosticReport?_count=100")
    assert len(reports) == 3 and {r["status"] for r in reports} == {"preliminary"}
    studies_stored = fhir.search("ImagingStudy?_count=100")
    assert {i["identifier"][0]["value"] for i in studies_stored} == {f"urn:oid:{uid}" for uid, _ in studies.values()}
    for kind in ("Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport", "ServiceRequest"):
        for resource in fhir.search(f"{kind}?_count=100"):
            assert fhir.validate(resource) == [], kind
