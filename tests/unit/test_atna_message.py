"""agent/audit/atna.py and the RFC 5424 header of agent/audit/syslog.py, without a network: what the
DICOM PS3.15 A.5 messages hold for the rows the agent writes (the delivery: tests/loopback/test_atna_rsyslog.py)."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from datetime import datetime

from ps315_schema import problems

from agent.audit.atna import MAX_DETAIL_BYTES, Row, audit_message
from agent.audit.syslog import BOM, rfc5424

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
