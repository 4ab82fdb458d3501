"""The DICOM PS3.15 A.5.1 audit message schema (RELAX NG compact, in the standard) as structure checks.

No offline validator for the compact syntax is installed, so this follows the schema's patterns by
hand: element order, required and allowed attributes, enumerated values, base64 and xsd:dateTime
values. ``problems(root)`` lists every departure (empty: valid).
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET

CODED = {"csd-code", "codeSystemName", "displayName", "originalText"}
DATETIME = re.compile(r"^-?\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")


def _b64(text: str | None) -> bool:
    try:
        base64.b64decode(text or "", validate=True)
        return True
    except binascii.Error:
        return False


def _attrs(el: ET.Element, allowed: set[str], required: set[str], out: list[str]) -> None:
    extra = set(el.attrib) - allowed
    missing = required - set(el.attrib)
    if extra:
        out.append(f"{el.tag}: attributes not in the schema {sorted(extra)}")
    if missing:
        out.append(f"{el.tag}: required attributes missing {sorted(missing)}")


def _enum(el: ET.Element, name: str, values: set[str], out: list[str]) -> None:
    if name in el.attrib and el.attrib[name] not in values:
        out.append(f"{el.tag}@{name}: {el.attrib[name]!r} not one of the schema's values")


def _coded(el: ET.Element, out: list[str]) -> None:
    _attrs(el, CODED, {"csd-code", "codeSystemName", "originalText"}, out)
    if len(el):
        out.append(f"{el.tag}: a coded value has no children")


def _sequence(el: ET.Element, pattern: str, out: list[str]) -> None:
    """Children's tags, in order, against a regex over 'Tag,' tokens."""
    tags = "".join(c.tag + "," for c in el)
    if not re.fullmatch(pattern, tags):
        out.append(f"{el.tag}: children {tags!r} do not follow the schema")


def _event(el: ET.Element, out: list[str]) -> None:
    _attrs(el, {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"},
           {"EventDateTime", "EventOutcomeIndicator"}, out)  # fmt: skip
    _enum(el, "EventActionCode", {"C", "R", "U", "D", "E"}, out)
    _enum(el, "EventOutcomeIndicator", {"0", "4", "8", "12"}, out)
    if not DATETIME.match(el.get("EventDateTime", "")):
        out.append("EventIdentification@EventDateTime: not an xsd:dateTime")
    _sequence(el, r"EventID,(EventTypeCode,)*(EventOutcomeDescription,)?", out)
    for c in el:
        if c.tag != "EventOutcomeDescription":
            _coded(c, out)


def _participant(el: ET.Element, out: list[str]) -> None:
    _attrs(el, {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor", "NetworkAccessPointID",
                "NetworkAccessPointTypeCode"}, {"UserID", "UserIsRequestor"}, out)  # fmt: skip
    _enum(el, "UserIsRequestor", {"true", "false", "1", "0"}, out)
    _enum(el, "NetworkAccessPointTypeCode", {"1", "2", "3", "4", "5"}, out)
    _sequence(el, r"(RoleIDCode,)*(MediaIdentifier,)?", out)
    for c in el.findall("RoleIDCode"):
        _coded(c, out)


def _source(el: ET.Element, out: list[str]) -> None:
    _attrs(el, {"AuditEnterpriseSiteID", "AuditSourceID"}, {"AuditSourceID"}, out)
    _sequence(el, r"(AuditSourceTypeCode,)*", out)
    for c in el:
        _attrs(c, CODED, {"csd-code"}, out)
        if c.get("csd-code") not in {str(i) for i in range(1, 10)} and "codeSystemName" not in c.attrib:
            out.append("AuditSourceTypeCode: a code other than 1-9 needs a codeSystemName")


def _description(el: ET.Element, out: list[str]) -> None:
    _sequence(el, r"(MPPS,)*(Accession,)*(SOPClass,)*(ParticipantObjectContainsStudy,)?(Encrypted,)?(Anonymized,)?",
              out)  # fmt: skip
    for sop in el.findall("SOPClass"):
        _attrs(sop, {"UID", "NumberOfInstances"}, {"NumberOfInstances"}, out)
        if not sop.get("NumberOfInstances", "").isdigit():
            out.append("SOPClass@NumberOfInstances: not an integer")
        _sequence(sop, r"(Instance,)*", out)
        for inst in sop:
            _attrs(inst, {"UID"}, {"UID"}, out)


def _object(el: ET.Element, out: list[str]) -> None:
    allowed = {"ParticipantObjectID", "ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
               "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"}
    _attrs(el, allowed, {"ParticipantObjectID"}, out)
    _enum(el, "ParticipantObjectTypeCode", {"1", "2", "3", "4"}, out)
    _enum(el, "ParticipantObjectTypeCodeRole", {str(i) for i in range(1, 27)}, out)
    _enum(el, "ParticipantObjectDataLifeCycle", {str(i) for i in range(1, 16)}, out)
    _sequence(el, r"ParticipantObjectIDTypeCode,(ParticipantObjectName,|ParticipantObjectQuery,)"
                  r"(ParticipantObjectDetail,)*(ParticipantObjectDescription,)*", out)  # fmt: skip
    for c in el:
        if c.tag == "ParticipantObjectIDTypeCode":
            _coded(c, out)
        elif c.tag == "ParticipantObjectQuery" and not _b64(c.text):
            out.append("ParticipantObjectQuery: not base64")
        elif c.tag == "ParticipantObjectDetail":
            _attrs(c, {"type", "value"}, {"type", "value"}, out)
            if not _b64(c.get("value")):
                out.append("ParticipantObjectDetail@value: not base64")
        elif c.tag == "ParticipantObjectDescription":
            _description(c, out)


def problems(root: ET.Element) -> list[str]:
    out: list[str] = []
    if root.tag != "AuditMessage":
        return [f"root is {root.tag}, not AuditMessage"]
    _attrs(root, set(), set(), out)
    _sequence(root, r"EventIdentification,(ActiveParticipant,)+AuditSourceIdentification,"
                    r"(ParticipantObjectIdentification,)*", out)  # fmt: skip
    check = {"EventIdentification": _event, "ActiveParticipant": _participant,
             "AuditSourceIdentification": _source, "ParticipantObjectIdentification": _object}  # fmt: skip
    for c in root:
        if c.tag in check:
            check[c.tag](c, out)
    return out
