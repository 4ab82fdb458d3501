"""What a message about a study says is read from the same sanitized values as the SR."""

from __future__ import annotations

import pytest
from ehr_sample import study

from agent.reporting import equipment


def test_the_result_carries_patient_study_and_the_index_image() -> None:
    r = study()
    assert (r.patient_id, r.issuer_of_patient_id, r.patient_sex) == ("MRN-0042", "HOSP-A", "F")
    assert r.patient_name == "Doe^Jane^Q" and r.patient_birth_date == "19470312"
    assert r.accession_number == "ACC-7781" and r.study_date == "20261201"
    assert r.positive and r.severity == "osteoporosis"
    assert r.index_image.probability == 0.8731 and r.index_image.laterality == "R"
    assert [i.label for i in r.images] == ["Right knee AP", "Left knee AP"]
    assert r.device_uid == equipment.device_uid(r.algorithm)
    assert "NOT FOR DIAGNOSTIC USE" in r.impression and "NOT FOR DIAGNOSTIC USE" in r.disclaimer


def test_values_the_sr_would_not_carry_are_absent() -> None:
    r = study(PatientBirthDate="25/03/1945", PatientSex="male", AccessionNumber="")
    assert r.patient_birth_date is None and r.accession_number is None
    assert r.patient_sex == "M"  # read leniently where the meaning is clear (docs/dicom-values.md)


def test_a_negative_study_has_no_severity() -> None:
    r = study(positive=False)
    assert not r.positive and r.severity is None and r.index_image.probability == 0.3011


def test_with_knees_the_study_level_observations_are_the_index_knees() -> None:
    """Two films of the right knee (P 0.8731 and 0.1523) and one of the left (P 0.6): per image the
    right knee's first film is the index, per knee the right knee falls to P 0.5 (below 0.55)
    and the left knee (0.6) is the study's index: the HL7 OBX and the FHIR Observations say so."""
    import json
    from datetime import UTC, datetime

    import hl7
    from ehr_sample import ALGO, sources
    from pydicom.uid import generate_uid

    from agent.config import FhirSection, Hl7Section
    from agent.domain import Findings
    from agent.ehr.content import study_result
    from agent.ehr.fhir_bundle import build_bundle
    from agent.ehr.hl7_oru import build_oru
    from agent.pipeline.knees import study_knees

    uid = generate_uid()
    srcs = sources(uid) + [sources(uid)[0]]  # R, L, R
    srcs[2].SOPInstanceUID = generate_uid()
    right = Findings(0.8731, 0.55, True, 0.71, "osteoporosis", -2.73, -3.41, -1.96, 0.9, ALGO)
    left = Findings(0.60, 0.55, True, 0.2, "osteopenia", -1.9, -2.6, -1.2, 0.9, ALGO)
    repeat = Findings(0.1269, 0.55, False, 0.05, None, -0.4, -1.1, 0.3, 0.9, ALGO)  # logit = -logit(0.8731)
    fs = [right, left, repeat]
    knees = study_knees(["R", "L", "R"], fs)
    r = study_result(srcs, fs, report_sop_instance_uid=generate_uid(), report_series_instance_uid=generate_uid(),
                     revision=1, reported_at=datetime(2026, 12, 1, tzinfo=UTC), knees=knees)  # fmt: skip
    assert [(k.label, len(k.sop_instance_uids)) for k in r.knees] == [("Right knee", 2), ("Left knee", 1)]
    assert r.knees[0].probability == pytest.approx(0.5) and not r.knees[0].bone_loss  # the mean of +z and -z
    assert r.index_image.probability == 0.8731  # image-level figures stay
    assert r.index_knee is r.knees[1] and r.index_result is r.knees[1]
    assert r.positive and r.severity == "osteopenia"  # the positive knee's, not the osteoporotic film's
    assert "Per knee: bone loss suspected in 1 of 2 knees." in r.impression
    msg = hl7.parse(build_oru(r, Hl7Section(name="ris", host="127.0.0.1", port=1), "C1").decode())
    by_code = {str(s(3)(1)(1)): s for s in msg.segments("OBX")}
    assert str(by_code["122157"](5)) == "60" and str(by_code["T-SCORE-EST"](5)) == "-1.90"
    assert str(by_code["SCREEN-RESULT"](5)(1)(1)) == "312894000"  # osteopenia
    b = json.loads(build_bundle(r, FhirSection(name="ehr", base_url="https://ehr.example/fhir")))
    observations = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Observation"]
    probability = next(o for o in observations if o["identifier"][0]["value"].endswith("/probability"))
    assert probability["valueQuantity"]["value"] == 60 and probability["bodySite"]["text"] == "Left knee"
