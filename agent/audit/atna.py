"""One audit_events row as a DICOM PS3.15 A.5 audit message (the XML an IHE ATNA audit repository takes).

Pure: the row, plus what the exporter looked up about the study it touched (``StudyContext``), in;
UTF-8 XML bytes out. The mapping of each event the agent writes is in docs/atna.md. These messages
carry patient and study identifiers by design (they go to the audit repository only); nothing here
logs or raises with a value of the row.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: our own process names as audit actors (the rest are AE titles of peers, or web users)
OWN_ACTORS = frozenset({"strnet", "strnet-cli", "strnet-worker", "strnet-digest", "strnet-sweep"})
#: the JSON of a row's detail is cut to this many bytes (the whole row stays in the hash chain), so a
#: message stays under 8,000 bytes: RFC 5425 asks every receiver to take 8 KiB, rsyslog's default
#: limit is 8,096, and it is one UDP datagram
MAX_DETAIL_BYTES = 1500

#: characters XML 1.0 does not allow (control characters but tab, LF and CR; surrogates; U+FFFE/F)
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# (code, scheme, meaning)
Code = tuple[str, str, str]

USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
TYPE_CODES: dict[str, Code] = {
    "start": ("110120", "DCM", "Application Start"),
    "stop": ("110121", "DCM", "Application Stop"),
    "login": ("110122", "DCM", "Login"),
    "logout": ("110123", "DCM", "Logout"),
    "restricted": ("110132", "DCM", "Use of Restricted Function"),
    "object_security": ("110135", "DCM", "Object Security Attributes Changed"),
    "user_security": ("110137", "DCM", "User Security Attributes Changed"),
}
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
STUDY_UID: Code = ("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
SEARCH_CRITERIA: Code = ("10", "RFC-3881", "Search Criteria")
USER_IDENTIFIER: Code = ("11", "RFC-3881", "User Identifier")
#: C-FIND Study Root Query/Retrieve Information Model - FIND: the SOP class of a sweep's queries
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: our own object kinds, in a local coding scheme (PS3.15 allows any scheme with a meaning)
LOCAL_SCHEME = "99STRNET"


@dataclass(frozen=True)
class Row:
    """What the message is built from: one audit_events row."""

    id: int
    at: datetime  # UTC (naive in SQLite)
    event_code: str
    event_name: str
    action: str
    outcome: int
    actor: str
    object_type: str | None
    object_id: str | None
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class StudyContext:
    """The study an instance, report or study event touched, as the database holds it."""

    study_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def event_datetime(at: datetime) -> str:
    """xsd:dateTime in UTC with Z, milliseconds."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="milliseconds") + "Z"


def _event_type(row: Row) -> Code | None:
    d = row.detail or {}
    if row.event_code in ("110122", "110123"):
        return TYPE_CODES["login" if row.event_code == "110122" else "logout"]
    if row.event_code == "110100" and d.get("activity") in ("start", "stop"):
        return TYPE_CODES[str(d["activity"])]
    if row.event_code == "110113":
        if d.get("change") in ("user_added", "user_disabled"):
            return TYPE_CODES["user_security"]
        if "refused" in d or d.get("alert") == "login_throttled":
            return TYPE_CODES["restricted"]
        if d.get("problem") == "conflicting duplicate":
            return TYPE_CODES["object_security"]
    return None


def _outcome_description(row: Row) -> str | None:
    if row.outcome == 0:
        return None
    d = row.detail or {}
    for key in ("problem", "refused", "alert", "change", "reason"):
        if isinstance(d.get(key), str):
            return f"{key}: {d[key]}"
    return None


def _access_point(host: object) -> dict[str, str]:
    if not isinstance(host, str) or not host:
        return {}
    try:
        ipaddress.ip_address(host)
        kind = "2"  # IP address
    except ValueError:
        kind = "1"  # machine name
    return {"NetworkAccessPointID": host, "NetworkAccessPointTypeCode": kind}


def _participant(root: ET.Element, user: str, requestor: bool, role: Code | None, **extra: str) -> None:
    el = ET.SubElement(root, "ActiveParticipant", {"UserID": user, "UserIsRequestor": "true" if requestor else "false",
                                                    **extra})  # fmt: skip
    if role is not None:
        _coded(el, "RoleIDCode", role)


def _participants(root: ET.Element, row: Row, local_id: str) -> None:
    d = row.detail or {}
    transfer = row.event_code in ("110104", "110102")
    own = row.actor in OWN_ACTORS or row.actor == local_id
    if row.object_type == "instance":  # an instance a peer sent us
        _participant(root, row.actor, True, ROLE_SOURCE, **_access_point(d.get("peer_host")))
        _participant(root, local_id, False, ROLE_DESTINATION)
        return
    if row.object_type == "storage_commitment":  # the PACS reported it keeps what we sent
        _participant(root, local_id, False, ROLE_SOURCE)
        _participant(root, row.actor, True, ROLE_DESTINATION)
        return
    if row.event_code == "110102" or row.object_type in ("study_query", "series_query"):
        # a sweep's retrieve or C-FIND: we ask the PACS (named in the detail or the object)
        _participant(root, row.actor, True, ROLE_DESTINATION if transfer else ROLE_SOURCE)
        pacs = d.get("pacs") if transfer else row.object_id
        if isinstance(pacs, str) and pacs:
            _participant(root, pacs, False, ROLE_SOURCE if transfer else ROLE_DESTINATION)
        return
    role = ROLE_SOURCE if transfer else (ROLE_APPLICATION if own else None)
    _participant(root, row.actor, True, role, **_access_point(d.get("client")))
    if not own:  # a web user or peer acted on the agent
        _participant(root, local_id, False, ROLE_APPLICATION)


def _object(
    root: ET.Element, object_id: str, id_type: Code, type_code: str, role: str | None, *,
    name: str | None = None, query: bytes | None = None, detail: bytes | None = None,
) -> ET.Element:  # fmt: skip
    attrs = {"ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code}
    if role is not None:
        attrs["ParticipantObjectTypeCodeRole"] = role
    el = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
    _coded(el, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(query).decode("ascii")
    else:  # the schema asks for a name or a query
        ET.SubElement(el, "ParticipantObjectName").text = name or id_type[2]
    if detail is not None:
        ET.SubElement(el, "ParticipantObjectDetail", {"type": "strnet-detail",
                                                      "value": base64.b64encode(detail).decode("ascii")})  # fmt: skip
    return el


def detail_json(detail: dict[str, Any] | None) -> bytes | None:
    """The row's detail as compact JSON, cut to MAX_DETAIL_BYTES (then only its keys, marked)."""
    if not detail:
        return None
    raw = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False).encode()
    if len(raw) <= MAX_DETAIL_BYTES:
        return raw
    cut = {"truncated": True, "keys": sorted(detail)[:50]}
    return json.dumps(cut, separators=(",", ":"), ensure_ascii=False).encode()[:MAX_DETAIL_BYTES]


def _study_objects(root: ET.Element, ctx: StudyContext, lifecycle: str | None, detail: bytes | None) -> None:
    study = _object(root, ctx.study_uid, STUDY_UID, "2", "3", name="Study", detail=detail)
    if lifecycle is not None:
        study.set("ParticipantObjectDataLifeCycle", lifecycle)
    if ctx.sop_instance_uid is not None:
        desc = ET.SubElement(study, "ParticipantObjectDescription")
        sop = ET.SubElement(desc, "SOPClass", {"NumberOfInstances": "1"})
        if ctx.sop_class_uid:
            sop.set("UID", ctx.sop_class_uid)
        ET.SubElement(sop, "Instance", {"UID": ctx.sop_instance_uid})
    if ctx.patient_id:
        _object(root, ctx.patient_id, PATIENT_NUMBER, "1", "1", name=ctx.patient_name or "Patient")


def _objects(root: ET.Element, row: Row, ctx: StudyContext | None) -> None:
    detail = detail_json(row.detail)
    kind = row.object_type
    if ctx is not None and kind in ("instance", "report", "study"):
        _study_objects(root, ctx, "1" if row.action == "C" else None, detail)
        return
    if kind is None:
        if detail is not None:  # what happened (replay counts, start, stop): on the agent itself
            _object(root, "strnet", (LOCAL_SCHEME + "-application", LOCAL_SCHEME, "Application"), "2", "4",
                    detail=detail)  # fmt: skip
        return
    oid = row.object_id or kind
    if kind.endswith("_query"):  # a sweep's C-FIND: the keys are in the detail
        _object(root, oid, SOP_CLASS_UID, "2", "24", query=detail or b"{}")
    elif kind in ("flagged_list", "audit_log") and row.event_code == "110112":
        _object(root, oid, SEARCH_CRITERIA, "2", "24", query=detail or b"{}")
    elif kind == "user":
        _object(root, oid, USER_IDENTIFIER, "2", "11", detail=detail)
    else:  # our own records: flagged_patient, result, outbox_item, model, database, flagged_list, ...
        role = {"flagged_patient": "1", "result": "3", "flagged_list": "7", "database": "5"}.get(kind, "4")
        _object(root, oid, (kind, LOCAL_SCHEME, kind.replace("_", " ")), "2", role, detail=detail)


def audit_message(row: Row, *, source_id: str, local_id: str, ctx: StudyContext | None = None) -> bytes:
    """The PS3.15 A.5 AuditMessage of ``row`` as UTF-8 XML (one line, with its XML declaration).

    ``source_id``: AuditSourceID; ``local_id``: the agent as an active participant (its AE title)."""
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": row.action if row.action in ("C", "R", "U", "D", "E") else "E",
        "EventDateTime": event_datetime(row.at),
        "EventOutcomeIndicator": str(row.outcome) if row.outcome in (0, 4, 8, 12) else "8",
    })  # fmt: skip
    if row.event_code in ("110122", "110123"):  # our Login/Logout rows: User Authentication events
        _coded(ev, "EventID", USER_AUTHENTICATION)
    else:
        _coded(ev, "EventID", (row.event_code, "DCM", row.event_name))
    event_type = _event_type(row)
    if event_type is not None:
        _coded(ev, "EventTypeCode", event_type)
    description = _outcome_description(row)
    if description is not None:
        ET.SubElement(ev, "EventOutcomeDescription").text = description
    _participants(root, row, local_id)
    src = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    _objects(root, row, ctx)
    for el in root.iter():  # a value from the wire (a patient name with ISO 2022 escapes) stays well-formed
        el.attrib.update({k: _XML_INVALID.sub("", v) for k, v in el.attrib.items()})
        if el.text:
            el.text = _XML_INVALID.sub("", el.text)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="utf-8", xml_declaration=False)
