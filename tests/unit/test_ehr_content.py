"""What a message about a study says is read from the same sanitized values as the SR."""

from __future__ import annotations

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
