"""One screened study as an HL7 v2.5.1 ORU^R01 (docs/hl7.md is its interface spec).

Built with hl7apy in v2.5.1 at its strict validation level, then parsed back and validated again
from the ER7 bytes that go out, so what is sent is what was checked. Every text value is escaped
here (``escape``) before hl7apy sees it: hl7apy reads an assigned string as ER7, so a "^" in a
patient name would otherwise split it into components. Numbers print as in the SR (percentages to
4 decimals, T-scores to 2), codes are the SR's (agent/reporting/codes.py).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from pydicom.sr.coding import Code

from agent.config import Hl7Section
from agent.ehr.content import StudyResult
from agent.errors import BuildError
from agent.reporting import codes

VERSION = "2.5.1"
CHARSET = "UNICODE UTF-8"  # MSH-18; the bytes are UTF-8
CONTROL_ID_LENGTH = 20  # MSH-10 is ST(20) in v2.5.1

# HL7 table 0396 names: SNOMED CT, DICOM, UCUM as in the SR; 99STRNET is a local "99zzz" system
_SYSTEMS = {"SCT": "SCT", "DCM": "DCM", "UCUM": "UCUM", codes.SCHEME: codes.SCHEME}
# OBX-3 of the Study Instance UID observation (DICOM PS3.16 DCM 110180)
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
# PID-5 is required in v2.5.1: without a name in the header, only its XPN.7 name type code,
# U (unspecified; table 0200), and no name made up
NAME_UNKNOWN = "^^^^^^U"
_SEX = {"M": "M", "F": "F", "O": "O"}  # DICOM PatientSex -> HL7 table 0001 (U, A, N never come)


def control_id(report_sop_instance_uid: str, dest_name: str) -> str:
    """MSH-10 of the message about this SR revision sent to this destination: the same every time
    it is built, so a resend carries the same id and the receiver can tell it is one. 20 characters
    of base32 (A-Z, 2-7) from SHA-256: 100 bits, no HL7 delimiter, no UID readable from it."""
    digest = hashlib.sha256(f"{report_sop_instance_uid}\x00{dest_name}".encode()).digest()
    return base64.b32encode(digest).decode("ascii")[:CONTROL_ID_LENGTH]


_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def escape(value: str) -> str:
    """A text value as ER7 with the default delimiters (|^~\\&): each delimiter as its escape
    sequence (v2.5.1 2.7.1), a control character (CR, LF ...) as \\Xhh\\."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\X{ord(ch):02X}\\")
        else:
            out.append(ch)
    return "".join(out)


def _components(*values: str | None) -> str:
    """Components joined by "^", each escaped, empty trailing ones dropped."""
    parts = [escape(v) if v else "" for v in values]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def _coded(code: Code) -> str:
    """CE/CWE: identifier^text^name of coding system."""
    return _components(str(code.value), str(code.meaning), _SYSTEMS[str(code.scheme_designator)])


def _dtm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _study_dtm(date: str | None, time: str | None) -> str:
    """OBR-7 from DICOM StudyDate and StudyTime (local time, no offset known: none written);
    empty without a date. DTM takes at most 4 fractional digits."""
    if not date:
        return ""
    if not time:
        return date
    whole, _, fraction = time.partition(".")
    return date + whole + (f".{fraction[:4]}" if fraction and len(whole) == 6 else "")


def _percent(probability: float) -> str:
    """A probability as a percentage to 4 decimals, as the SR states it (87.31, not 87.3100)."""
    text = f"{round(probability * 100.0, 4) + 0.0:.4f}".rstrip("0").rstrip(".")
    return text or "0"


def _t(value: float) -> str:
    return f"{round(value, 2) + 0.0:.2f}"


def person_name(pn: str | None) -> str:
    """PID-5 (XPN) from a DICOM PN: the first non-empty component group (alphabetic, else
    ideographic, else phonetic), its components Family^Given^Middle^Prefix^Suffix written in
    XPN's order Family^Given^Middle^Suffix^Prefix."""
    if not pn:
        return ""
    group = next((g for g in pn.split("=") if g.replace("^", "").strip()), "")
    family, given, middle, prefix, suffix = ([c.strip() for c in group.split("^")] + [""] * 5)[:5]
    return _components(family, given, middle, suffix, prefix)


def _classification(result: StudyResult) -> Code:
    """The study's screening result as the SR's finding type states it: Normal, else the worst
    severity (Osteopenia, Osteoporosis), else (positive without a severity) Bone loss suspected."""
    if not result.positive:
        return codes.NORMAL
    return {"osteopenia": codes.OSTEOPENIA, "osteoporosis": codes.OSTEOPOROSIS}.get(
        result.severity or "", codes.BONE_LOSS_SUSPECTED
    )


def _observations(result: StudyResult) -> list[dict[str, str]]:
    """The study-level OBX segments' fields (by OBX field number), in order."""
    image = result.index_result  # the index knee (the index image for a result without knees)
    percent, t_score = _coded(codes.UNIT_PERCENT), _coded(codes.UNIT_T_SCORE)
    rows: list[dict[str, str]] = [
        {"2": "CWE", "3": _coded(codes.SCREENING_RESULT), "5": _coded(_classification(result)),
         "8": "A" if result.positive else "N"},
        {"2": "NM", "3": _coded(codes.PROBABILITY), "5": _percent(image.probability), "6": percent,
         "7": f"<{_percent(image.threshold)}", "8": "A" if image.bone_loss else "N",
         "17": _coded(codes.P_BONE_LOSS_METHOD)},
        {"2": "NM", "3": _coded(codes.P_OSTEOPOROSIS), "5": _percent(image.p_osteoporosis_given_bone_loss),
         "6": percent},
        {"2": "NM", "3": _coded(codes.ESTIMATED_T_SCORE), "5": _t(image.t_score), "6": t_score},
        {"2": "NM", "3": _coded(codes.T_SCORE_LOWER), "5": _t(image.t_score_low), "6": t_score},
        {"2": "NM", "3": _coded(codes.T_SCORE_UPPER), "5": _t(image.t_score_high), "6": t_score},
        {"2": "NM", "3": _coded(codes.INTERVAL_COVERAGE), "5": _percent(image.interval_coverage), "6": percent},
    ]  # fmt: skip
    # OBX-18: which model said it (name and version; the SR's Device Observer UID identifies the
    # checkpoint); OBX-19: when.
    equipment = _components(f"{result.algorithm.name} {result.algorithm.version}", None, result.device_uid, "ISO")
    for row in rows:
        row.update({"11": "P", "18": equipment, "19": _dtm(result.reported_at)})
    rows.append({"2": "ST", "3": _coded(STUDY_INSTANCE_UID), "5": escape(result.study_instance_uid), "11": "P"})
    return rows


def _build(result: StudyResult, dest: Hl7Section, control: str) -> Message:
    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3 = _components(dest.sending_application)
    if dest.sending_facility:
        msh.msh_4 = _components(dest.sending_facility)
    if dest.receiving_application:
        msh.msh_5 = _components(dest.receiving_application)
    if dest.receiving_facility:
        msh.msh_6 = _components(dest.receiving_facility)
    msh.msh_7 = _dtm(result.reported_at)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_18 = CHARSET

    patient_result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = patient_result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    pid.pid_3 = _components(result.patient_id, None, None, result.issuer_of_patient_id)
    pid.pid_5 = person_name(result.patient_name) or NAME_UNKNOWN
    if result.patient_birth_date:
        pid.pid_7 = result.patient_birth_date
    if result.patient_sex in _SEX:
        pid.pid_8 = _SEX[result.patient_sex]

    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    if result.accession_number:
        obr.obr_3 = _components(result.accession_number)
    obr.obr_4 = _coded(codes.PLAIN_XRAY_KNEE)
    study_time = _study_dtm(result.study_date, result.study_time)
    if study_time:
        obr.obr_7 = study_time
    obr.obr_22 = _dtm(result.reported_at)
    obr.obr_25 = "P"
    nte = order.add_segment("NTE")
    nte.nte_1 = "1"
    nte.nte_2 = "L"
    nte.nte_3 = escape(result.disclaimer)
    for n, row in enumerate(_observations(result), start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_1 = str(n)
        for number, value in row.items():
            setattr(obx, f"obx_{number}", value)
    return msg


def build_oru(result: StudyResult, dest: Hl7Section, control_id: str) -> bytes:
    """The ORU^R01 about ``result`` for ``dest`` as ER7 bytes (every segment ended by CR, UTF-8),
    validated by hl7apy (v2.5.1, strict) from those bytes. A study without a Patient ID gets none:
    PID-3 is required, and a result that names no patient cannot be filed (BuildError)."""
    if not result.patient_id:
        raise BuildError("the study has no Patient ID: an ORU^R01 needs PID-3 to name the patient")
    if not control_id or len(control_id) > CONTROL_ID_LENGTH or escape(control_id) != control_id:
        raise BuildError(f"a control id (MSH-10) is 1 to {CONTROL_ID_LENGTH} characters, no HL7 delimiter")
    try:
        er7 = _build(result, dest, control_id).to_er7() + "\r"  # CR ends every segment, the last too
        parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    except (HL7apyException, ValueError) as exc:  # their text may quote a value: the class only
        raise BuildError(f"the ORU^R01 failed HL7 v{VERSION} validation ({exc.__class__.__name__})") from None
    return er7.encode("utf-8")
