"""Each SR brings one message per HL7 and FHIR destination, recorded in the SR's commit
(agent/queue/reporter.py, agent/ehr/messages.py): the message file is in the results folder and
its outbox row PENDING (SHADOW in shadow mode); a message that cannot be built is DEAD with a
reason that names no patient value, and the SR and the other messages go on; a destination with
``send_swept = false`` gets nothing for a study the archive sweep retrieved.

The routes' builders here are small functions of the ``StudyResult`` (the real HL7 and FHIR
builders have their own tests); the reporter, outbox and database are the real ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import agent_settings, free_port
from pydicom.uid import generate_uid
from screening_helpers import screened
from sqlalchemy import select

from agent.clock import utcnow
from agent.db.engine import open_database
from agent.db.models import OutboxItem, StudyReport, SweepStudy
from agent.domain import AlgorithmInfo, OutboxState, ServedModel
from agent.ehr.content import StudyResult
from agent.ehr.messages import FHIR, HL7, MessageRoute
from agent.queue.reporter import StudyReporter
from agent.spool import Spool

OWNER = "test-worker"
ALGO = AlgorithmInfo("STR-Net", "test-1", "0" * 64)
SERVED = ServedModel(ALGO, 0.4, {"default": 0.4}, 0.9, "cpu")
NAME, PID = "Quimbly^Ottoline", "PID-42"


def _ok(result: StudyResult) -> bytes:
    return f"{result.patient_id}|{result.study_instance_uid}|{result.revision}|{result.positive}".encode()


def _broken(result: StudyResult) -> bytes:
    raise ValueError(f"cannot encode {result.patient_name} ({result.patient_id})")  # as a careless library would


def _route(name: str, kind: str, build: object, send_swept: bool = True) -> MessageRoute:
    return MessageRoute(name, kind, "ORU^R01" if kind == HL7 else "Bundle", ".txt", send_swept, None, build)  # type: ignore[arg-type]


@pytest.fixture()
def make_reporter(tmp_path: Path) -> Iterator[object]:
    made: list[StudyReporter] = []

    def make(routes: list[MessageRoute] | None, send: bool = True, **over: object) -> StudyReporter:
        pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
        settings = agent_settings(
            tmp_path / f"agent{len(made)}", pacs=pacs, sender={"send": send},
            reporting={"build_processes": 0, "quiet_period_s": 0, "overlay": False}, **over,
        )  # fmt: skip
        r = StudyReporter(settings, open_database(settings), Spool(settings.spool_dir), Spool(settings.results_dir),
                          served_model=lambda: SERVED, message_routes=routes)  # fmt: skip
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
        r.db.dispose()


def _rows(reporter: StudyReporter) -> dict[str, OutboxItem]:
    with reporter.db.reading() as s:
        return {o.destination: o for o in s.execute(select(OutboxItem)).scalars()}


def test_each_destination_gets_its_message_and_a_broken_one_is_dead_without_phi(make_reporter: object) -> None:
    reporter = make_reporter([_route("ehr-hl7", HL7, _ok), _route("ehr-fhir", FHIR, _broken)])  # type: ignore[operator]
    study_uid = screened(reporter)
    assert reporter.report_ready_studies() == 1
    rows = _rows(reporter)
    with reporter.db.reading() as s:
        sr_uid = s.execute(select(StudyReport.sop_instance_uid)).scalar_one()
    assert rows["pacs"].kind == "sr" and rows["pacs"].state == OutboxState.PENDING.value
    hl7 = rows["ehr-hl7"]
    assert (hl7.kind, hl7.state, hl7.sop_instance_uid, hl7.sop_class_uid) == (HL7, "PENDING", sr_uid, "ORU^R01")
    assert reporter.results.path(hl7.path).read_bytes() == f"{PID}|{study_uid}|1|True".encode()
    assert hl7.path.startswith("messages/") and "ehr-hl7" not in hl7.path  # a setting never names a file
    fhir = rows["ehr-fhir"]
    assert (fhir.kind, fhir.state, fhir.path) == (FHIR, "DEAD", "")
    assert fhir.last_error is not None and fhir.last_error.startswith("fhir message could not be built: ValueError")
    for value in (PID, "Quimbly", "Ottoline"):
        assert value not in fhir.last_error


def test_shadow_mode_records_messages_unsent(make_reporter: object) -> None:
    reporter = make_reporter([_route("ehr-hl7", HL7, _ok)], send=False)  # type: ignore[operator]
    screened(reporter)
    assert reporter.report_ready_studies() == 1
    assert _rows(reporter)["ehr-hl7"].state == OutboxState.SHADOW.value


def test_a_destination_without_send_swept_gets_live_studies_only(make_reporter: object) -> None:
    routes = [_route("live-only", HL7, _ok, send_swept=False), _route("all", FHIR, _ok)]
    reporter = make_reporter(routes)  # type: ignore[operator]
    swept_uid = generate_uid()
    with reporter.db.transaction() as s:
        s.add(SweepStudy(study_instance_uid=swept_uid, pacs="archive", state="retrieving", study_date="20261201",
                         send_results=True, attempts=1, found_at=utcnow()))  # fmt: skip
    screened(reporter, swept_uid)
    assert reporter.report_ready_studies() == 1
    assert set(_rows(reporter)) == {"pacs", "all"}
    live = make_reporter(routes)  # type: ignore[operator]
    screened(live)
    assert live.report_ready_studies() == 1
    assert set(_rows(live)) == {"pacs", "all", "live-only"}


def test_the_configured_hl7_and_fhir_builders_make_their_messages(make_reporter: object) -> None:
    """The routes of [[hl7]] and [[fhir]] (agent/ehr/messages.py) with the real builders."""
    reporter = make_reporter(  # type: ignore[operator]
        None,
        hl7=[{"name": "ehr-hl7", "host": "127.0.0.1", "port": free_port()}],
        fhir=[{"name": "ehr-fhir", "base_url": "http://127.0.0.1:9/fhir"}],
    )
    screened(reporter)
    assert reporter.report_ready_studies() == 1
    rows = _rows(reporter)
    assert (rows["ehr-hl7"].state, rows["ehr-fhir"].state) == ("PENDING", "PENDING"), rows["ehr-fhir"].last_error
    assert reporter.results.path(rows["ehr-hl7"].path).read_bytes().startswith(b"MSH|^~\\&|STRNET|")
    bundle = json.loads(reporter.results.path(rows["ehr-fhir"].path).read_bytes())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
