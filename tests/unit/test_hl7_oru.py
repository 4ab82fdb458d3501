"""The ORU^R01 of agent/ehr/hl7_oru.py read back by an independent parser (python-hl7, which
unescapes what it reads), and validated by hl7apy (v2.5.1, strict) from the bytes."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from ehr_sample import ALGO, findings, sources, study
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.uid import generate_uid

from agent.config import Hl7Section
from agent.ehr import hl7_oru
from agent.ehr.content import StudyResult, study_result
from agent.ehr.delivery import Delivery
from agent.ehr.hl7_oru import build_oru, control_id
from agent.ehr.mllp import parse_ack, verdict
from agent.errors import BuildError, reason_of
from agent.reporting import equipment

DEST = Hl7Section(name="ris", host="127.0.0.1", port=1, sending_facility="RADIOLOGY",
                  receiving_application="EHR", receiving_facility="GENERAL")  # fmt: skip


def parsed(result: StudyResult, dest: Hl7Section = DEST, control: str = "CTRL0001") -> Any:
    raw = build_oru(result, dest, control)
    assert raw.endswith(b"\r") and b"\n" not in raw
    return hl7.parse(raw.decode("utf-8"))


def obx(msg: Any, code: str) -> Any:
    """The OBX whose OBX-3 identifier is ``code`` (exactly one)."""
    found = [s for s in msg.segments("OBX") if str(s(3)(1)(1)) == code]
    assert len(found) == 1, code
    return found[0]


def test_sample_study_reads_back_field_by_field() -> None:
    result = study()
    msg = parsed(result)
    assert [str(s(0)) for s in msg] == ["MSH", "PID", "OBR", "NTE"] + ["OBX"] * 8
    # MSH
    assert msg["MSH.F3"] == "STRNET" and msg["MSH.F4"] == "RADIOLOGY"
    assert msg["MSH.F5"] == "EHR" and msg["MSH.F6"] == "GENERAL"
    assert msg["MSH.F7"] == "20261201100507+0000"  # reported_at, UTC
    assert [msg[f"MSH.F9.R1.C{i}"] for i in (1, 2, 3)] == ["ORU", "R01", "ORU_R01"]
    assert msg["MSH.F10"] == "CTRL0001" and msg["MSH.F11"] == "P" and msg["MSH.F12"] == "2.5.1"
    assert msg["MSH.F18"] == "UNICODE UTF-8"
    # PID
    assert msg["PID.F3.R1.C1"] == "MRN-0042" and msg["PID.F3.R1.C4"] == "HOSP-A"
    assert [msg[f"PID.F5.R1.C{i}"] for i in (1, 2, 3)] == ["Doe", "Jane", "Q"]
    assert msg["PID.F7"] == "19470312" and msg["PID.F8"] == "F"
    # OBR
    assert msg["OBR.F3"] == "ACC-7781"
    assert [msg[f"OBR.F4.R1.C{i}"] for i in (1, 2, 3)] == ["74016001", "Plain X-ray of knee", "SCT"]
    assert msg["OBR.F7"] == "20261201093015"
    assert msg["OBR.F22"] == "20261201100507+0000" and msg["OBR.F25"] == "P"
    # NTE: the disclaimer, from the filler
    assert msg["NTE.F2"] == "L" and msg["NTE.F3"] == result.disclaimer
    assert "NOT FOR DIAGNOSTIC USE" in msg["NTE.F3"]
    # OBX: the study's result, from its index image (the right knee: P 0.8731)
    classification = obx(msg, "SCREEN-RESULT")
    assert str(classification(2)) == "CWE" and str(classification(3)(1)(3)) == "99STRNET"
    assert [str(classification(5)(1)(i)) for i in (1, 2, 3)] == ["64859006", "Osteoporosis", "SCT"]
    assert str(classification(8)) == "A"
    p = obx(msg, "122157")
    assert (str(p(2)), str(p(5)), str(p(6)(1)(1)), str(p(6)(1)(3))) == ("NM", "87.31", "%", "UCUM")
    assert str(p(7)) == "<42.17" and str(p(8)) == "A"
    assert str(p(17)(1)(1)) == "P-BONE-LOSS" and str(p(17)(1)(3)) == "99STRNET"
    assert str(obx(msg, "P-OSTEOPOROSIS")(5)) == "71"
    t = obx(msg, "T-SCORE-EST")
    assert (str(t(2)), str(t(5)), str(t(6)(1)(1)), str(t(6)(1)(3))) == ("NM", "-2.73", "{T-score}", "UCUM")
    assert str(obx(msg, "T-SCORE-LO")(5)) == "-3.41" and str(obx(msg, "T-SCORE-HI")(5)) == "-1.96"
    assert str(obx(msg, "T-SCORE-COV")(5)) == "90"
    uid = obx(msg, "110180")
    assert (str(uid(2)), str(uid(3)(1)(3)), str(uid(5))) == ("ST", "DCM", result.study_instance_uid)
    for segment in msg.segments("OBX"):
        assert str(segment(11)) == "P"
    for segment in msg.segments("OBX")[:-1]:  # the findings say which model, and when
        assert str(segment(18)(1)(1)) == f"{ALGO.name} {ALGO.version}"
        assert (str(segment(18)(1)(3)), str(segment(18)(1)(4))) == (result.device_uid, "ISO")
        assert str(segment(19)) == "20261201100507+0000"
    assert [str(s(1)) for s in msg.segments("OBX")] == [str(n) for n in range(1, 9)]


def test_hl7apy_strict_validation_passes_on_the_bytes_sent() -> None:
    raw = build_oru(study(), DEST, "CTRL0001").decode("utf-8")
    message = parse_message(raw, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate() is True
    assert message.children[0].name == "MSH"
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.OBR.obr_25.to_er7() == "P"


def test_negative_study_is_normal_and_osteopenia_is_its_own_code() -> None:
    msg = parsed(study(positive=False))
    normal = obx(msg, "SCREEN-RESULT")
    assert [str(normal(5)(1)(i)) for i in (1, 2, 3)] == ["17621005", "Normal", "SCT"]
    assert str(normal(8)) == "N" and str(obx(msg, "122157")(8)) == "N"
    assert str(obx(msg, "122157")(5)) == "30.11"  # the index image is still the highest P
    osteopenia = dataclasses.replace(study(), severity="osteopenia")
    assert str(obx(parsed(osteopenia), "SCREEN-RESULT")(5)(1)(1)) == "312894000"
    unknown = dataclasses.replace(study(), severity=None)
    assert [str(obx(parsed(unknown), "SCREEN-RESULT")(5)(1)(i)) for i in (1, 3)] == ["BONE-LOSS", "99STRNET"]


def test_person_name_components_in_xpn_order() -> None:
    msg = parsed(study(PatientName="Curie^Marie^Salomea^Dr.^PhD"))
    # DICOM PN: Family^Given^Middle^Prefix^Suffix; XPN: Family^Given^Middle^Suffix^Prefix
    assert [msg[f"PID.F5.R1.C{i}"] for i in (1, 2, 3, 4, 5)] == ["Curie", "Marie", "Salomea", "PhD", "Dr."]
    assert parsed(study(PatientName="Curie"))["PID.F5"] == "Curie"


def test_missing_patient_values_are_left_empty() -> None:
    result = study(PatientName="", IssuerOfPatientID="", PatientBirthDate="", PatientSex="", AccessionNumber="",
                   StudyDate="", StudyTime="")  # fmt: skip
    raw = build_oru(result, DEST, "CTRL0001").decode("utf-8")
    msg = hl7.parse(raw)
    pid = msg.segment("PID")
    assert str(pid(3)) == "MRN-0042"  # no assigning authority
    assert str(pid(5)) == "^^^^^^U"  # PID-5 is required: only the name type code U (unspecified)
    assert msg["PID.F7"] == "" and msg["PID.F8"] == ""
    assert msg["OBR.F3"] == "" and msg["OBR.F7"] == ""
    assert parse_message(raw, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


def test_a_study_without_patient_id_gets_no_message() -> None:
    with pytest.raises(BuildError) as caught:
        build_oru(study(PatientID=""), DEST, "CTRL0001")
    assert "PID-3" in reason_of(caught.value)


def test_non_ascii_name_is_utf8() -> None:
    raw = build_oru(study(PatientName="Müller^Zoë"), DEST, "CTRL0001")
    assert "Müller^Zoë".encode() in raw
    msg = hl7.parse(raw.decode("utf-8"))
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"]) == ("Müller", "Zoë")
    ideographic = parsed(study(PatientName="=山田^太郎"))  # no alphabetic group: the ideographic one
    assert (ideographic["PID.F5.R1.C1"], ideographic["PID.F5.R1.C2"]) == ("山田", "太郎")


def test_values_with_hl7_delimiters_are_escaped() -> None:
    dest = DEST.model_copy(update={"sending_application": "KNEE|AI", "sending_facility": "X-RAY\\WEST|2",
                                   "receiving_application": "EHR^A&B~C"})  # fmt: skip
    result = study(PatientName="O'Neil&Sons|~^Ann^M", PatientID="ID|1^2", IssuerOfPatientID="A&B~C",
                   AccessionNumber="ACC^9|&")  # fmt: skip
    raw = build_oru(result, dest, "CTRL0001").decode("utf-8")
    assert "O'Neil\\T\\Sons\\F\\\\R\\^Ann^M" in raw and "X-RAY\\E\\WEST\\F\\2" in raw
    msg = hl7.parse(raw)
    assert len(msg.segment("PID")) == 9  # no field split off by a "|" in a value
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"], msg["PID.F5.R1.C3"]) == ("O'Neil&Sons|~", "Ann", "M")
    assert (msg["PID.F3.R1.C1"], msg["PID.F3.R1.C4"]) == ("ID|1^2", "A&B~C")
    assert msg["OBR.F3"] == "ACC^9|&"
    assert msg["MSH.F3"] == "KNEE|AI"  # hl7 sending_application, not the default STRNET
    assert msg["MSH.F4"] == "X-RAY\\WEST|2" and msg["MSH.F5"] == "EHR^A&B~C"
    assert parse_message(raw, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


def test_control_id_is_deterministic_short_and_per_destination() -> None:
    result = study()
    first = control_id(result.report_sop_instance_uid, "ris")
    assert first == control_id(result.report_sop_instance_uid, "ris") and len(first) == 20
    assert set(first) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")  # base32: no HL7 delimiter
    assert first != control_id(result.report_sop_instance_uid, "ris2")
    assert first != control_id(study().report_sop_instance_uid, "ris")
    # a rebuild for a resend is the same message, byte for byte
    assert build_oru(result, DEST, first) == build_oru(result, DEST, first)
    with pytest.raises(BuildError):
        build_oru(result, DEST, "X" * 21)
    with pytest.raises(BuildError):
        build_oru(result, DEST, "A|B")


def test_study_time_with_fraction_and_date_only() -> None:
    assert parsed(study(StudyTime="093015.123456"))["OBR.F7"] == "20261201093015.1234"
    assert parsed(study(StudyTime=""))["OBR.F7"] == "20261201"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # pydicom, on the planted date
def test_invalid_header_values_are_left_empty() -> None:
    msg = parsed(study(PatientSex="Q", PatientBirthDate="12/03/1947", PatientName="==Yamada^Taro"))
    assert msg["PID.F8"] == "" and msg["PID.F7"] == ""
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"]) == ("Yamada", "Taro")  # the phonetic group, alone


def test_a_message_that_fails_validation_is_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hl7_oru, "NAME_UNKNOWN", "")  # PID-5, required, left empty
    with pytest.raises(BuildError) as caught:
        build_oru(study(PatientName=""), DEST, "CTRL0001")
    assert reason_of(caught.value) == "the ORU^R01 failed HL7 v2.5.1 validation (ValidationError)"


def test_control_characters_are_escaped_as_hex() -> None:
    assert hl7_oru.escape("a\rb\nc|") == "a\\X0D\\b\\X0A\\c\\F\\"


def test_a_later_revision_keeps_the_accession_with_its_own_time_and_control_id() -> None:
    srcs = sources()
    first, later = (
        study_result(srcs, findings(), report_sop_instance_uid=generate_uid(), report_series_instance_uid="1.2.3",
                     revision=n, reported_at=datetime(2026, 12, 1, 10, n, tzinfo=UTC))
        for n in (1, 2)
    )  # fmt: skip
    a = parsed(first, control=control_id(first.report_sop_instance_uid, "ris"))
    b = parsed(later, control=control_id(later.report_sop_instance_uid, "ris"))
    assert a["OBR.F3"] == b["OBR.F3"] == "ACC-7781"
    assert (a["OBR.F22"], b["OBR.F22"]) == ("20261201100100+0000", "20261201100200+0000")
    assert a["MSH.F10"] != b["MSH.F10"]


# ---- docs/hl7.md states what the builder does -------------------------------------------------

DOC = (Path(__file__).parents[2] / "docs" / "hl7.md").read_text(encoding="utf-8")


def _doc_block(after: str) -> str:
    return DOC.split(after, 1)[1].split("```\n", 2)[1]


def _example() -> str:
    result = dataclasses.replace(study(), study_instance_uid="2.25.299792458314159265358979323846264338",
                                 report_sop_instance_uid="2.25.161803398874989484820458683436563811")  # fmt: skip
    dest = DEST.model_copy(update={"host": "ris.example.org"})
    return build_oru(result, dest, control_id(result.report_sop_instance_uid, dest.name)).decode("utf-8")


def test_docs_example_is_what_the_builder_sends() -> None:
    assert _doc_block("## Example").replace("\n", "\r") == _example()


def test_docs_field_table_names_every_filled_field_and_only_those() -> None:
    table = DOC.split("### Fields", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| ([A-Z]{3}-\d+) \|", table, re.M))
    filled = set()
    for segment in _example().rstrip("\r").split("\r"):
        fields = segment.split("|")
        name = fields[0]
        for n, value in enumerate(fields[1:], start=1):
            if value and not (name == "MSH" and n == 1):  # MSH-2, the delimiters themselves
                filled.add(f"{name}-{n if name != 'MSH' else n + 1}")
    assert documented == filled


def test_docs_observation_table_is_the_obx_order() -> None:
    section = DOC.split("### Observations", 1)[1]
    rows = re.findall(r"^\| (\d) \| (\w+) \| `([^`]+)` \| .*? \|\s*`?([^|`]*?)`?\s*\|$", section, re.M)
    msg = hl7.parse(_example())
    assert [(str(s(1)), str(s(2)), str(s(3)), str(s(6))) for s in msg.segments("OBX")] == rows


def test_docs_ack_example_answers_the_example_message() -> None:
    ack = parse_ack(_doc_block("Its ACK, for example:").replace("\n", "\r").encode())
    control = hl7.parse(_example())["MSH.F10"]
    assert verdict(ack, control) == Delivery("delivered", "AA")


@pytest.mark.parametrize("sex", ["M", "F", "O"])
def test_sex_is_sent_as_it_is(sex: str) -> None:
    assert parsed(study(PatientSex=sex))["PID.F8"] == sex


def test_obx18_names_the_checkpoint() -> None:
    result = study()
    other = dataclasses.replace(ALGO, checkpoint_sha256="f" * 64)
    retrained = dataclasses.replace(result, algorithm=other, device_uid=equipment.device_uid(other))
    a, b = parsed(result)["OBX.F18.R1.C3"], parsed(retrained)["OBX.F18.R1.C3"]
    assert a == result.device_uid and b == equipment.device_uid(other) and a != b


def test_probabilities_go_to_4_decimals_and_t_scores_to_2() -> None:
    """docs/hl7.md, Observations: a probability as % to 4 decimals, a T-score to 2."""
    first, second = findings()
    fine = dataclasses.replace(first, probability=0.923456789, p_osteoporosis_given_bone_loss=0.5,
                               threshold=0.1, t_score=-2.7349, t_score_low=-3.0, t_score_high=0.004)  # fmt: skip
    result = study_result(sources(), [fine, second], report_sop_instance_uid=generate_uid(),
                          report_series_instance_uid="1.2.3", revision=1,
                          reported_at=datetime(2026, 12, 1, tzinfo=UTC))  # fmt: skip
    msg = parsed(result)
    assert str(obx(msg, "122157")(5)) == "92.3457" and str(obx(msg, "P-OSTEOPOROSIS")(5)) == "50"
    t_scores = [str(obx(msg, code)(5)) for code in ("T-SCORE-EST", "T-SCORE-LO", "T-SCORE-HI")]
    assert t_scores == ["-2.73", "-3.00", "0.00"]
