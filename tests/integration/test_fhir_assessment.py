"""A radiologist's verdict sent onward (``[[fhir]] send_assessments``): after the study's preliminary
report is in a real FHIR server (Medplum's router), a confirmation updates the same
DiagnosticReport and its Observations to final, a later rejection to amended with the reason in its
conclusion; the server holds one report throughout. Reporter, outbox, sender lanes, FHIR transport
and the web's verdict recording (agent/db/fls.py) are the real ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import agent_settings, free_port
from fhir_server.medplum import MedplumServer
from screening_helpers import screened
from sqlalchemy import select

from agent.db import fls
from agent.db.engine import open_database
from agent.db.models import Result, Study
from agent.domain import AlgorithmInfo, OutboxState, ServedModel
from agent.ehr import messages
from agent.pacs.sender import Sender
from agent.queue import outbox
from agent.queue.reporter import StudyReporter
from agent.spool import Spool

pytestmark = [pytest.mark.integration]

SERVED = ServedModel(AlgorithmInfo("STR-Net", "test-1", "0" * 64), 0.4, {"default": 0.4}, 0.9, "cpu")


@pytest.fixture()
def fhir(tmp_path: Path) -> Iterator[MedplumServer]:
    server = MedplumServer(tmp_path)
    yield server
    server.stop()


def test_a_confirmation_makes_the_report_final_and_a_rejection_amended(tmp_path: Path, fhir: MedplumServer) -> None:
    settings = agent_settings(
        tmp_path / "agent", reporting={"build_processes": 0, "quiet_period_s": 0, "overlay": False},
        pacs=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        sender={"send": True}, fhir=[{"name": "ehr", "base_url": fhir.base_url, "send_assessments": True}],
    )  # fmt: skip
    db = open_database(settings)
    results = Spool(settings.results_dir)
    reporter = StudyReporter(settings, db, Spool(settings.spool_dir), results, served_model=lambda: SERVED)
    routes = messages.routes(settings)
    sender = Sender(db, results, [], settings.sender, "STRNET", message_routes=routes, transports=messages.transports())
    try:
        study_uid = screened(reporter)
        assert reporter.report_ready_studies() == 1
        sender.run_once()

        def report() -> dict:
            (found,) = fhir.search("DiagnosticReport?_count=10")
            return found

        assert report()["status"] == "preliminary"
        with db.reading() as s:
            result_id = s.execute(select(Result.id)).scalar_one()
            study_id = s.execute(select(Study.id).where(Study.study_instance_uid == study_uid)).scalar_one()
        assert fls.assess_finding(db, result_id, "rad", "agree", None) is not None
        assert reporter.report_assessment(study_id) == 1
        sender.run_once()
        confirmed = report()
        assert confirmed["status"] == "final" and "the finding was confirmed" in confirmed["conclusion"]
        assert {o["status"] for o in fhir.search("Observation?_count=10")} == {"final"}
        assert fls.assess_finding(db, result_id, "rad", "disagree", "cortex normal on review") is not None
        assert reporter.report_assessment(study_id) == 1
        sender.run_once()
        rejected = report()
        assert rejected["status"] == "amended" and "rejected (cortex normal on review)" in rejected["conclusion"]
        assert rejected["id"] == confirmed["id"]  # the same report, updated
        for resource in [rejected, *fhir.search("Observation?_count=10")]:
            assert fhir.validate(resource) == []
        assert {o.state for o in outbox.items(db)} == {OutboxState.DELIVERED.value, OutboxState.DEAD.value}
        assert [o.state for o in outbox.items(db) if o.kind == "fhir"] == ["DELIVERED"] * 3
    finally:
        sender.stop()
        reporter.close()
        db.dispose()


def test_without_send_assessments_a_verdict_sends_nothing(tmp_path: Path) -> None:
    settings = agent_settings(
        tmp_path / "agent", reporting={"build_processes": 0, "quiet_period_s": 0, "overlay": False},
        pacs=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        fhir=[{"name": "ehr", "base_url": "http://127.0.0.1:9/fhir"}],
    )  # fmt: skip
    db = open_database(settings)
    reporter = StudyReporter(settings, db, Spool(settings.spool_dir), Spool(settings.results_dir),
                             served_model=lambda: SERVED)  # fmt: skip
    try:
        screened(reporter)
        assert reporter.report_ready_studies() == 1
        with db.reading() as s:
            result_id, study_id = s.execute(select(Result.id, Result.study_id)).one()
        assert fls.assess_finding(db, result_id, "rad", "agree", None) is not None
        assert reporter.report_assessment(study_id) == 0
    finally:
        reporter.close()
        db.dispose()
