"""agent/ehr/fhir_bundle.py: what the transaction Bundle of one study says, and that its keys are
stable (docs/fhir.md). The server's side of it is tests/integration/test_fhir_server.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from ehr_sample import study
from pydicom.uid import generate_uid

from agent.config import FhirSection
from agent.ehr.content import Assessment
from agent.ehr.fhir_bundle import PRIVATE_CODE_SYSTEM, build_bundle
from agent.errors import BuildError

SCT = "http://snomed.info/sct"


def dest(**kw: Any) -> FhirSection:
    return FhirSection(name="ehr", base_url="https://ehr.example/fhir", **kw)


def bundle(result: Any = None, **kw: Any) -> dict[str, Any]:
    return json.loads(build_bundle(result or study(), dest(**kw)))


def by_type(b: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in b["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e)
    return out


def codings(cc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in cc["coding"]}


def obs(b: dict[str, Any], name: str) -> dict[str, Any]:
    for e in by_type(b)["Observation"]:
        if e["resource"]["identifier"][0]["value"].endswith("/" + name):
            return dict(e["resource"])
    raise AssertionError(name)


def test_a_positive_study_is_a_transaction_of_every_resource_in_order() -> None:
    b = bundle()
    assert b["resourceType"] == "Bundle" and b["type"] == "transaction"
    kinds = [e["resource"]["resourceType"] for e in b["entry"]]
    assert kinds == ["Patient", "Device", "ImagingStudy", "Observation", "Observation", "Observation",
                     "DiagnosticReport", "ServiceRequest"]  # fmt: skip


def test_the_diagnostic_report_points_at_its_patient_study_and_observations() -> None:
    r = study()
    b = bundle(r)
    t = by_type(b)
    report = t["DiagnosticReport"][0]["resource"]
    assert report["status"] == "preliminary"
    assert codings(report["category"][0]) == {("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD")}
    assert report["subject"]["reference"] == t["Patient"][0]["fullUrl"]
    assert report["imagingStudy"] == [{"reference": t["ImagingStudy"][0]["fullUrl"]}]
    assert [x["reference"] for x in report["result"]] == [e["fullUrl"] for e in t["Observation"]]
    assert report["conclusion"] == r.impression
    assert report["effectiveDateTime"] == "2026-12-01" and report["issued"] == "2026-12-01T10:05:07+00:00"
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{r.report_sop_instance_uid}", "use": "secondary"} in report[
        "identifier"
    ]
    study_res = t["ImagingStudy"][0]["resource"]
    assert study_res["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{r.study_instance_uid}"}
    assert study_res["identifier"][1]["value"] == "ACC-7781"
    device = t["Device"][0]["resource"]
    assert device["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{r.device_uid}"}]
    assert device["version"] == [{"value": "0.3.1-test"}] and device["deviceName"][0]["name"] == "STR-Net"
    for e in t["Observation"]:
        assert e["resource"]["device"]["reference"] == t["Device"][0]["fullUrl"]
        assert e["resource"]["status"] == "preliminary"


def test_the_observations_carry_classification_probability_and_t_score_with_interval() -> None:
    b = bundle()
    cls = obs(b, "classification")
    assert codings(cls["code"]) == {(PRIVATE_CODE_SYSTEM, "SCREEN-RESULT")}
    assert codings(cls["valueCodeableConcept"]) == {(PRIVATE_CODE_SYSTEM, "BONE-LOSS")}
    assert codings(cls["component"][0]["valueCodeableConcept"]) == {(SCT, "64859006")}  # osteoporosis
    p = obs(b, "probability")
    assert p["valueQuantity"] == {"value": 87.31, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
    assert codings(p["method"]) == {(PRIVATE_CODE_SYSTEM, "P-BONE-LOSS")}
    assert [c["valueQuantity"]["value"] for c in p["component"]] == [42.17, 71.0]  # threshold, P(osteoporosis|bl)
    t = obs(b, "t-score")
    assert t["valueQuantity"]["value"] == -2.73 and t["valueQuantity"]["code"] == "{T-score}"
    assert [(next(iter(codings(c["code"])))[1], c["valueQuantity"]["value"]) for c in t["component"]] == [
        ("T-SCORE-LO", -3.41), ("T-SCORE-HI", -1.96), ("T-SCORE-COV", 90.0)]  # fmt: skip
    assert "referenceRange" not in t


def test_a_negative_study_is_normal_and_gets_no_referral() -> None:
    b = bundle(study(positive=False))
    cls = obs(b, "classification")
    assert codings(cls["valueCodeableConcept"]) == {(SCT, "17621005")} and "component" not in cls
    assert "ServiceRequest" not in by_type(b) and "Task" not in by_type(b)


def test_the_referral_kind_follows_the_setting() -> None:
    sr = by_type(bundle())["ServiceRequest"][0]["resource"]
    assert (sr["intent"], sr["status"]) == ("proposal", "active") and codings(sr["code"]) == {(SCT, "312681000")}
    task = by_type(bundle(referral="task"))["Task"][0]["resource"]
    assert (task["intent"], task["status"]) == ("proposal", "requested")
    assert set(by_type(bundle(referral="none"))) == {"Patient", "Device", "ImagingStudy", "Observation",
                                                     "DiagnosticReport"}  # fmt: skip


def test_after_a_rejection_the_bundle_carries_no_referral() -> None:
    at = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    for referral in ("service-request", "task"):
        confirmed = bundle(dataclasses.replace(study(), assessment=Assessment("confirmed", (), at)), referral=referral)
        assert {"ServiceRequest", "Task"} & set(by_type(confirmed))  # a confirmed finding still refers
        rejected = bundle(
            dataclasses.replace(study(), assessment=Assessment("rejected", ("cortex normal",), at)), referral=referral
        )
        assert set(by_type(rejected)) == {"Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport"}
        report = by_type(rejected)["DiagnosticReport"][0]["resource"]
        assert report["status"] == "amended" and report["conclusion"].endswith("was rejected (cortex normal).")


def test_every_entry_is_conditional_on_its_identifier() -> None:
    for e in bundle()["entry"]:
        ident = e["resource"]["identifier"][0]
        key = f"identifier={ident['system']}|{ident['value']}"
        if e["resource"]["resourceType"] in ("DiagnosticReport", "Observation"):
            assert e["request"] == {"method": "PUT", "url": f"{e['resource']['resourceType']}?{key}"}
        else:
            assert e["request"] == {"method": "POST", "url": e["resource"]["resourceType"], "ifNoneExist": key}


def test_the_patient_key_uses_the_issuer_when_there_is_one() -> None:
    with_issuer = by_type(bundle())["Patient"][0]["resource"]
    assert with_issuer["identifier"][0]["system"] == "urn:dicom:issuer:HOSP-A"
    without = by_type(bundle(study(IssuerOfPatientID=""), patient_identifier_system="urn:oid:1.2.3"))
    assert without["Patient"][0]["resource"]["identifier"][0]["system"] == "urn:oid:1.2.3"
    p = with_issuer
    assert (p["name"][0]["family"], p["birthDate"], p["gender"]) == ("Doe", "1947-03-12", "female")


def test_the_private_codes_stay_fixed_whatever_identifier_system_says() -> None:
    b = bundle(identifier_system="urn:oid:1.2.3.4")
    report = by_type(b)["DiagnosticReport"][0]["resource"]
    assert report["identifier"][0]["system"] == "urn:oid:1.2.3.4:diagnostic-report"  # the keys follow it
    assert report["extension"][0]["url"] == "urn:strnet-agent:99STRNET:revision"  # the codes do not
    assert codings(obs(b, "classification")["code"]) == {("urn:strnet-agent:99STRNET", "SCREEN-RESULT")}
    assert "urn:oid:1.2.3.4:99STRNET" not in json.dumps(b)


def test_identifiers_are_stable_across_resends_revisions_and_studies() -> None:
    first = study()
    assert build_bundle(first, dest()) == build_bundle(first, dest())  # a resend is the same bytes
    revised = dataclasses.replace(first, revision=2, report_sop_instance_uid=generate_uid())
    a, b = bundle(first), bundle(revised)
    assert [e["fullUrl"] for e in a["entry"]] == [e["fullUrl"] for e in b["entry"]]
    assert [e["request"] for e in a["entry"]] == [e["request"] for e in b["entry"]]
    assert a != b  # the SR UID and the revision differ
    other = bundle(study())  # another study of the same patient
    same = ("Patient", "Device", "ServiceRequest")
    for kind in same:
        assert by_type(a)[kind][0]["request"] == by_type(other)[kind][0]["request"]
    for kind in ("ImagingStudy", "DiagnosticReport"):
        assert by_type(a)[kind][0]["request"] != by_type(other)[kind][0]["request"]
    assert "MRN-0042" not in json.dumps(by_type(a)["ServiceRequest"][0]["request"])  # keyed on a digest


def test_a_study_without_a_patient_id_is_refused_without_naming_values() -> None:
    with pytest.raises(BuildError) as err:
        build_bundle(study(PatientID=""), dest())
    assert "Patient ID" in str(err.value)


def test_a_value_r4_does_not_allow_is_refused_with_its_path_only() -> None:
    bad = dataclasses.replace(study(), revision="MRN-0042")  # type: ignore[arg-type]
    with pytest.raises(BuildError) as err:
        build_bundle(bad, dest())
    text = str(err.value)
    assert "valueInteger" in text and "MRN-0042" not in text


def test_the_conditional_search_escapes_fhir_and_url_separators() -> None:
    b = bundle(study(PatientID="A,B|C$D &E", IssuerOfPatientID=""))
    assert by_type(b)["Patient"][0]["request"]["ifNoneExist"] == (
        "identifier=urn:oid:1.2.840.10008.2.16.4|A%5C%2CB%5C%7CC%5C%24D%20%26E"
    )
