"""agent/audit/atna.py and the RFC 5424 header of agent/audit/syslog.py, without a network: what the
DICOM PS3.15 A.5 messages hold for the rows the agent writes (the delivery: tests/loopback/test_atna_rsyslog.py)."""

from __future__ import annotations

import base64
import json
import ssl
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import pytest
from ps315_schema import problems

from agent.audit.atna import MAX_DETAIL_BYTES, Row, StudyContext, audit_message
from agent.audit.syslog import BOM, rfc5424, tls_context
from agent.config import AtnaSection
from agent.errors import ConfigError

AT = datetime(2026, 12, 7, 10, 0, 0, 123456)


def _row(**kw: object) -> Row:
    base: dict[str, object] = {"id": 1, "at": AT, "event_code": "110113", "event_name": "Security Alert",
                               "action": "E", "outcome": 0, "actor": "alice", "object_type": None,
                               "object_id": None, "detail": None}  # fmt: skip
    base.update(kw)
    return Row(**base)  # type: ignore[arg-type]


def _xml(row: Row) -> ET.Element:
    root = ET.fromstring(audit_message(row, source_id="site-1", local_id="STRNET"))
    assert problems(root) == []
    return root


def test_a_large_detail_is_cut_and_the_message_stays_under_8_kib() -> None:
    detail = {"patients": list(range(5000)), "rows": 5000}
    row = _row(event_code="110112", event_name="Query", action="R", object_type="flagged_list", detail=detail)
    msg = rfc5424(audit_message(row, source_id="site-1", local_id="STRNET"), at=AT, outcome=0, app_name="strnet")
    assert len(msg) < 8192
    query = _xml(row).findtext("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert json.loads(base64.b64decode(query or "")) == {"truncated": True, "keys": ["patients", "rows"]}
    small = _row(object_type="user", object_id="4", detail={"change": "user_added", "role": "viewer"})
    value = _xml(small).find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert value is not None and json.loads(base64.b64decode(value.get("value", ""))) == small.detail
    assert len(json.dumps(detail)) > MAX_DETAIL_BYTES


def test_the_largest_message_stays_under_8000_bytes() -> None:
    """Every field at its column's length, every character one that XML escapes, the detail just
    under the cut: still under rsyslog's default limit (8,096 bytes)."""
    detail: dict[str, object] = {"problem": "conflicting duplicate", "peer_host": "&" * 64, "x": ""}
    detail["x"] = "<" * (MAX_DETAIL_BYTES - len(json.dumps(detail, separators=(",", ":"))))
    ctx = StudyContext("1." + "2" * 62, "&" * 64, "&" * 324, "1." + "2" * 62, "1." + "3" * 62)
    row = _row(outcome=8, actor="&" * 128, object_type="instance", object_id="1." + "3" * 62, detail=detail)
    body = audit_message(row, source_id="site-1", local_id="&" * 16, ctx=ctx)
    assert b"truncated" not in body
    assert problems(ET.fromstring(body)) == []
    assert len(rfc5424(body, at=AT, outcome=8, app_name="strnet")) < 8000


def test_failures_carry_their_outcome_severity_and_a_description() -> None:
    row = _row(outcome=8, detail={"alert": "login_throttled", "client": "10.0.0.9"})
    root = _xml(row)
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "8"
    assert ident.findtext("EventOutcomeDescription") == "alert: login_throttled"
    assert [t.get("csd-code") for t in ident.findall("EventTypeCode")] == ["110132"]
    requestor = root.find("ActiveParticipant")
    assert requestor is not None and requestor.get("NetworkAccessPointID") == "10.0.0.9"
    assert requestor.get("NetworkAccessPointTypeCode") == "2"
    for outcome, pri in ((0, b"<85>"), (4, b"<84>"), (8, b"<83>"), (12, b"<82>")):
        msg = rfc5424(b"<x/>", at=AT, outcome=outcome, app_name="strnet", hostname="h", procid="7")
        assert msg == pri + b"1 2026-12-07T10:00:00.123456Z h strnet 7 IHE+RFC-3881 - " + BOM + b"<x/>"


def test_header_fields_are_printable_ascii_within_their_limits() -> None:
    msg = rfc5424(b"<x/>", at=AT, outcome=0, app_name="strnet agent é" + "x" * 60, hostname=" ", procid="1")
    fields = msg.split(b" ")
    assert fields[2] == b"-"  # nothing printable: the nil value
    assert fields[3] == (b"strnetagent" + b"x" * 60)[:48]


CTX = StudyContext("1.2.3.4.5", "PAT-1", "Doe^Jane", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4.5.6")
STUDY = ("110180", "2")  # study object: (ParticipantObjectIDTypeCode, TypeCode)
PATIENT = ("2", "1")


def _p(user: str, requestor: bool, *roles: str) -> tuple[str, str, tuple[str, ...]]:
    return user, "true" if requestor else "false", roles


# one row as each caller writes it -> (EventID, EventTypeCodes, participants, objects (IDTypeCode, role))
MAPPING = [
    ("instance received",
     _row(event_code="110104", event_name="DICOM Instances Transferred", action="C", actor="PACS1",
          object_type="instance", object_id="1.2.3.4.5.6", detail={"job_id": 1, "peer_host": "10.0.0.5"}), CTX,
     "110104", [], [_p("PACS1", True, "110153"), _p("STRNET", False, "110152")], [("110180", "3"), ("2", "1")]),
    ("SR created",
     _row(event_code="110104", event_name="DICOM Instances Transferred", action="C", actor="strnet-worker",
          object_type="report", object_id="1.2.3.9", detail={"study_id": 1}), CTX,
     "110104", [], [_p("strnet-worker", True, "110153")], [("110180", "3"), ("2", "1")]),
    ("storage commitment",
     _row(event_code="110104", event_name="DICOM Instances Transferred", action="R", actor="PACS",
          object_type="storage_commitment", object_id="1.2.3.7", detail={"committed": 2}), None,
     "110104", [], [_p("STRNET", False, "110153"), _p("PACS", True, "110152")], [("storage_commitment", "4")]),
    ("sweep retrieve",
     _row(event_code="110102", event_name="Begin Transferring DICOM Instances", action="R", actor="STRNET",
          object_type="study", object_id="1.2.3.8", detail={"pacs": "archive"}), StudyContext("1.2.3.8"),
     "110102", [], [_p("STRNET", True, "110152"), _p("archive", False, "110153")], [("110180", "3")]),
    ("sweep C-FIND",
     _row(event_code="110112", event_name="Query", actor="STRNET", object_type="study_query", object_id="archive",
          detail={"found": 3}), None,
     "110112", [], [_p("STRNET", True, "110153"), _p("archive", False, "110152")], [("110181", "24")]),
    ("worklist viewed",
     _row(event_code="110112", event_name="Query", action="R", actor="alice", object_type="flagged_list",
          detail={"rows_shown": 2}), None,
     "110112", [], [_p("alice", True), _p("STRNET", False, "110150")], [("10", "24")]),
    ("patient page",
     _row(event_code="110110", event_name="Patient Record", action="R", actor="alice",
          object_type="flagged_patient", object_id="3", detail={"view": "patient_detail"}), None,
     "110110", [], [_p("alice", True), _p("STRNET", False, "110150")], [("flagged_patient", "1")]),
    ("overlay viewed",
     _row(event_code="110110", event_name="Patient Record", action="R", actor="alice", object_type="result",
          object_id="9", detail={"view": "overlay_image"}), None,
     "110110", [], [_p("alice", True), _p("STRNET", False, "110150")], [("result", "3")]),
    ("CSV export",
     _row(event_code="110106", event_name="Export", action="R", actor="alice", object_type="flagged_list",
          detail={"format": "csv"}), None,
     "110106", [], [_p("alice", True), _p("STRNET", False, "110150")], [("flagged_list", "7")]),
    ("database backup",
     _row(event_code="110106", event_name="Export", action="R", actor="strnet-cli", object_type="database",
          detail={"backup": "b.db"}), None,
     "110106", [], [_p("strnet-cli", True, "110150")], [("database", "5")]),
    ("start",
     _row(event_code="110100", event_name="Application Activity", actor="strnet", detail={"activity": "start"}),
     None, "110100", ["110120"], [_p("strnet", True, "110150")], [("99STRNET-application", "4")]),
    ("stop",
     _row(event_code="110100", event_name="Application Activity", actor="strnet", detail={"activity": "stop"}),
     None, "110100", ["110121"], [_p("strnet", True, "110150")], [("99STRNET-application", "4")]),
    ("model install",
     _row(event_code="110100", event_name="Application Activity", action="U", actor="strnet-cli",
          object_type="model", object_id="v3", detail={"activity": "model_install"}), None,
     "110100", [], [_p("strnet-cli", True, "110150")], [("model", "4")]),
    ("SR given up",
     _row(event_code="110100", event_name="Application Activity", outcome=8, actor="strnet-worker",
          object_type="study", object_id="7", detail={"change": "report_dead"}), CTX,
     "110100", [], [_p("strnet-worker", True, "110150")], [("110180", "3"), ("2", "1")]),
    ("login",
     _row(event_code="110122", event_name="Login", actor="alice", object_type="user", object_id="3",
          detail={"client": "10.0.0.9", "reason": "ok"}), None,
     "110114", ["110122"], [_p("alice", True), _p("STRNET", False, "110150")], [("11", "11")]),
    ("idle timeout",
     _row(event_code="110123", event_name="Logout", actor="alice", object_type="user", object_id="3",
          detail={"reason": "idle_timeout"}), None,
     "110114", ["110123"], [_p("alice", True), _p("STRNET", False, "110150")], [("11", "11")]),
    ("user disabled",
     _row(action="U", actor="adam", object_type="user", object_id="4", detail={"change": "user_disabled"}), None,
     "110113", ["110137"], [_p("adam", True), _p("STRNET", False, "110150")], [("11", "11")]),
    ("CSRF refusal",
     _row(outcome=4, actor="alice", detail={"refused": "csrf", "path": "/x"}), None,
     "110113", ["110132"], [_p("alice", True), _p("STRNET", False, "110150")], [("99STRNET-application", "4")]),
    ("role refusal",
     _row(outcome=4, actor="alice", detail={"refused": "role", "path": "/audit", "method": "GET",
                                            "client": "10.0.0.9"}), None,
     "110113", ["110132"], [_p("alice", True), _p("STRNET", False, "110150")], [("99STRNET-application", "4")]),
    ("login throttled",
     _row(outcome=8, actor="alice", object_type="user", object_id="3",
          detail={"alert": "login_throttled", "scope": "account", "backoff_s": 1.0, "client": "10.0.0.9"}), None,
     "110113", ["110132"], [_p("alice", True), _p("STRNET", False, "110150")], [("11", "11")]),
    ("conflicting duplicate",
     _row(outcome=4, actor="PACS1", object_type="instance", object_id="1.2.3.4.5.6",
          detail={"problem": "conflicting duplicate"}), CTX,
     "110113", ["110135"], [_p("PACS1", True, "110153"), _p("STRNET", False, "110152")],
     [("110180", "3"), ("2", "1")]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "row", "ctx", "event_id", "types", "participants", "objects"), MAPPING,
                         ids=[m[0] for m in MAPPING])  # fmt: skip
def test_each_event_the_agent_writes_maps_as_docs_atna_md_says(
    name: str, row: Row, ctx: StudyContext | None, event_id: str, types: list[str],
    participants: list[tuple[str, str, tuple[str, ...]]], objects: list[tuple[str, str]],
) -> None:  # fmt: skip
    root = ET.fromstring(audit_message(row, source_id="site-1", local_id="STRNET", ctx=ctx))
    assert problems(root) == []
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.find("EventID").get("csd-code") == event_id  # type: ignore[union-attr]
    assert [t.get("csd-code") for t in ident.findall("EventTypeCode")] == types
    got = [(p.get("UserID"), p.get("UserIsRequestor"), tuple(r.get("csd-code") for r in p.findall("RoleIDCode")))
           for p in root.findall("ActiveParticipant")]  # fmt: skip
    assert got == participants
    objs = [(o.find("ParticipantObjectIDTypeCode").get("csd-code"), o.get("ParticipantObjectTypeCodeRole"))  # type: ignore[union-attr]
            for o in root.findall("ParticipantObjectIdentification")]  # fmt: skip
    assert objs == objects
    codes = {o.find("ParticipantObjectIDTypeCode").get("codeSystemName")  # type: ignore[union-attr]
             for o in root.findall("ParticipantObjectIdentification")}  # fmt: skip
    assert codes <= {"DCM", "RFC-3881", "99STRNET"}
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "site-1"
    assert source.find("AuditSourceTypeCode").get("csd-code") == "4"  # type: ignore[union-attr]
    if ctx is not None and ctx.patient_id:  # the patient's ID and name go to the repository, by design
        patient = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
        assert patient is not None and patient.get("ParticipantObjectID") == "PAT-1"
        assert patient.findtext("ParticipantObjectName") == "Doe^Jane"


def test_tls_is_1_2_or_later(tmp_path: Path) -> None:
    ctx = tls_context(AtnaSection(enabled=True))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED


def test_control_characters_from_the_wire_leave_the_message_well_formed() -> None:
    ctx = StudyContext("1.2.3", "PAT\x00-1", "\x1b$BDoe\x1b(B^Jane\x07", None, None)
    row = _row(event_code="110104", event_name="DICOM Instances Transferred", action="C", actor="PACS\x01",
               object_type="instance", object_id="1.2.3.4", detail={"peer_host": "10.0.0.1"})
    root = ET.fromstring(audit_message(row, source_id="site-1", local_id="STRNET", ctx=ctx))
    assert problems(root) == []
    patient = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient is not None and patient.get("ParticipantObjectID") == "PAT-1"
    assert patient.findtext("ParticipantObjectName") == "$BDoe(B^Jane"


def test_a_ca_bundle_or_key_pair_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^atna.ca_file: cannot load the CA bundle \(FileNotFoundError\)"):
        tls_context(AtnaSection(enabled=True, ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"^atna.ca_file: cannot load the CA bundle \(SSLError\)"):
        tls_context(AtnaSection(enabled=True, ca_file=junk))
    with pytest.raises(ConfigError, match=r"^atna.cert_file: cannot load the client certificate"):
        tls_context(AtnaSection(enabled=True, cert_file=junk, key_file=junk))
