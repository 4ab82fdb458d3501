"""One screened study as a FHIR R4 transaction Bundle (docs/fhir.md is its interface spec).

The resources are written as plain dicts and then read by fhirclient's R4 (4.0.1) models in
strict mode and written back by them (``as_json``): a wrong type, an element R4 does not have or
a missing required element raises here, never at the server. fhirclient, not fhir.resources:
fhir.resources 6.x (the last to default to R4) needs pydantic 1, and 7.x/8.x are R5 with an R4B
subpackage, which is not R4.

Every entry is conditional, keyed on identifiers derived from stable values (the Study Instance
UID, the Device UID, the patient's identifier), so a resend creates nothing twice: Patient,
Device, ImagingStudy and the referral are conditional creates (``ifNoneExist``); the
DiagnosticReport and its Observations are conditional updates (``PUT Type?identifier=``), so a
later revision of the study's result replaces them. The fullUrls are name-based UUIDs of the same
identifiers: the same result builds the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any
from urllib.parse import quote

from fhirclient.models.bundle import Bundle
from fhirclient.models.fhirabstractbase import FHIRValidationError
from pydicom.sr.coding import Code

from agent.config import FhirSection
from agent.ehr.content import StudyResult
from agent.errors import BuildError
from agent.reporting import codes

FHIR_JSON = "application/fhir+json"
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: the code system of the 99STRNET codes (agent/reporting/codes.py), fixed: a code's meaning does not
#: depend on a setting
PRIVATE_CODE_SYSTEM = "urn:strnet-agent:99STRNET"
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    codes.SCHEME: PRIVATE_CODE_SYSTEM,
}
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

# Codes only the FHIR result uses.
BONE_DENSITOMETRY = Code("312681000", "SCT", "Bone densitometry")  # the DXA scan a referral proposes
FLS_REVIEW = Code("FLS-REVIEW", codes.SCHEME, "Fracture liaison service review")  # no standard concept

_GENDER = {"M": "male", "F": "female", "O": "other"}
_SEVERITY = {"osteopenia": codes.OSTEOPENIA, "osteoporosis": codes.OSTEOPOROSIS}


def coding(code: Code) -> dict[str, str]:
    return {"system": SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}


def concept(*items: Code, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [coding(c) for c in items]}
    if text:
        out["text"] = text
    return out


def _percent(fraction: float) -> dict[str, Any]:
    return {"value": round(fraction * 100, 2), "unit": "%", "system": SYSTEMS["UCUM"], "code": "%"}


def _t_score(value: float) -> dict[str, Any]:
    return {"value": round(value, 2), "unit": "T-score", "system": SYSTEMS["UCUM"], "code": "{T-score}"}


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _token(text: str) -> str:
    """A system or value in a token search: FHIR's escapes for its separators (``\\``, ``,``, ``$``,
    ``|``; R4 search 3.1.1.5.7), then those of a URL query."""
    for char in ("\\", ",", "$", "|"):
        text = text.replace(char, "\\" + char)
    return quote(text, safe=":/.-_")


def _search(system: str, value: str) -> str:
    """``identifier=system|value`` as a search parameter."""
    return f"identifier={_token(system)}|{_token(value)}"


def _full_url(resource_type: str, system: str, value: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{resource_type}|{system}|{value}"))


class _Keys:
    """The identifiers of one study's resources at one destination."""

    def __init__(self, result: StudyResult, dest: FhirSection) -> None:
        if not result.patient_id:
            raise BuildError("the study has no valid Patient ID: a FHIR result cannot name its patient")
        base = dest.identifier_system.rstrip(":/")
        issuer = result.issuer_of_patient_id
        self.patient = (
            f"urn:dicom:issuer:{quote(issuer, safe='')}" if issuer else dest.patient_identifier_system,
            result.patient_id,
        )
        self.device = (DICOM_UID_SYSTEM, _oid(result.device_uid))
        self.study = (DICOM_UID_SYSTEM, _oid(result.study_instance_uid))
        self.report = (f"{base}:diagnostic-report", result.study_instance_uid)
        self.observation_system = f"{base}:observation"
        # one referral per patient: a digest of the patient's identifier (no MRN in a second place)
        digest = hashlib.sha256("|".join(self.patient).encode("utf-8")).hexdigest()[:32]
        self.referral = (f"{base}:referral", digest)


def _identifier(key: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"system": key[0], "value": key[1], **extra}


def _entry(resource: dict[str, Any], key: tuple[str, str], *, update: bool = False) -> dict[str, Any]:
    kind = resource["resourceType"]
    search = _search(*key)
    request = (
        {"method": "PUT", "url": f"{kind}?{search}"}
        if update
        else {"method": "POST", "url": kind, "ifNoneExist": search}
    )
    return {"fullUrl": _full_url(kind, *key), "resource": resource, "request": request}


def _date(yyyymmdd: str | None) -> str | None:
    if not yyyymmdd or len(yyyymmdd) != 8:
        return None
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:]}"


def _name(pn: str | None) -> list[dict[str, Any]]:
    if not pn:
        return []
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    name: dict[str, Any] = {"use": "official"}
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [g for g in (given, middle) if g]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return [name] if len(name) > 1 else []


def _patient(result: StudyResult, keys: _Keys) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [_identifier(keys.patient, use="usual", type=concept_v2("MR", "Medical record number"))],
    }
    if name := _name(result.patient_name):
        patient["name"] = name
    if result.patient_sex in _GENDER:
        patient["gender"] = _GENDER[result.patient_sex]
    if birth := _date(result.patient_birth_date):
        patient["birthDate"] = birth
    return patient


def concept_v2(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": _V2_0203, "code": code, "display": display}]}


def _device(result: StudyResult, keys: _Keys) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "identifier": [_identifier(keys.device)],
        "status": "active",
        "deviceName": [{"name": result.algorithm.name, "type": "model-name"}],
        "version": [{"value": result.algorithm.version}],
        "note": [{"text": result.disclaimer}],
    }


def _imaging_study(result: StudyResult, keys: _Keys, patient_ref: str) -> dict[str, Any]:
    identifiers = [_identifier(keys.study)]
    if result.accession_number:
        identifiers.append({"type": concept_v2("ACSN", "Accession ID"), "value": result.accession_number})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": identifiers,
        "status": "available",
        "subject": {"reference": patient_ref},
    }
    if started := _date(result.study_date):
        study["started"] = started
    if result.study_description:
        study["description"] = result.study_description
    return study


def _observation(
    result: StudyResult, name: str, code: dict[str, Any], refs: dict[str, str], **content: Any
) -> tuple[dict[str, Any], tuple[str, str]]:
    key = (refs["observation_system"], f"{result.study_instance_uid}/{name}")
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [_identifier(key)],
        "status": _status(result),
        "category": [{"coding": [{"system": _OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": code,
        "subject": {"reference": refs["patient"]},
        "issued": result.reported_at.isoformat(timespec="seconds"),
        "device": {"reference": refs["device"]},
        "derivedFrom": [{"reference": refs["study"]}],
        "bodySite": concept(codes.KNEE, text=result.index_result.label),
        **content,
    }
    if effective := _date(result.study_date):
        observation["effectiveDateTime"] = effective
    return observation, key


def _observations(result: StudyResult, refs: dict[str, str]) -> list[tuple[dict[str, Any], tuple[str, str]]]:
    index = result.index_result  # the index knee (the index image for a result without knees)
    classification_components = []
    if result.positive and result.severity in _SEVERITY:
        classification_components.append(
            {"code": concept(codes.SEVERITY), "valueCodeableConcept": concept(_SEVERITY[result.severity])}
        )
    classification = _observation(
        result,
        "classification",
        concept(codes.SCREENING_RESULT),
        refs,
        valueCodeableConcept=concept(codes.BONE_LOSS_SUSPECTED if result.positive else codes.NORMAL),
        interpretation=[
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if result.positive else "NEG",
                        "display": "Positive" if result.positive else "Negative",
                    }
                ]
            }
        ],
        **({"component": classification_components} if classification_components else {}),
    )
    probability_components = [{"code": concept(codes.THRESHOLD), "valueQuantity": _percent(index.threshold)}]
    if index.bone_loss:
        probability_components.append(
            {"code": concept(codes.P_OSTEOPOROSIS), "valueQuantity": _percent(index.p_osteoporosis_given_bone_loss)}
        )
    probability = _observation(
        result,
        "probability",
        concept(codes.PROBABILITY),
        refs,
        method=concept(codes.P_BONE_LOSS_METHOD),
        valueQuantity=_percent(index.probability),
        component=probability_components,
    )
    t_score = _observation(
        result,
        "t-score",
        concept(codes.ESTIMATED_T_SCORE),
        refs,
        valueQuantity=_t_score(index.t_score),
        component=[
            {"code": concept(codes.T_SCORE_LOWER), "valueQuantity": _t_score(index.t_score_low)},
            {"code": concept(codes.T_SCORE_UPPER), "valueQuantity": _t_score(index.t_score_high)},
            {"code": concept(codes.INTERVAL_COVERAGE), "valueQuantity": _percent(index.interval_coverage)},
        ],
    )
    return [classification, probability, t_score]


def _status(result: StudyResult) -> str:
    """preliminary (no radiologist has read it); after a radiologist's verdict final when they
    confirmed the finding, amended when they rejected it."""
    if result.assessment is None:
        return "preliminary"
    return "final" if result.assessment.verdict == "confirmed" else "amended"


def _conclusion(result: StudyResult) -> str:
    a = result.assessment
    if a is None:
        return result.impression
    when = a.at.isoformat(timespec="seconds")
    if a.verdict == "confirmed":
        return f"{result.impression}\nRadiologist review ({when}): the finding was confirmed."
    reasons = "; ".join(a.reasons)
    return f"{result.impression}\nRadiologist review ({when}): the finding was rejected" + (
        f" ({reasons})." if reasons else "."
    )


def _diagnostic_report(result: StudyResult, keys: _Keys, refs: dict[str, str], results: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [
            _identifier(keys.report, use="official"),
            _identifier((DICOM_UID_SYSTEM, _oid(result.report_sop_instance_uid)), use="secondary"),
        ],
        "status": _status(result),
        "category": [{"coding": [{"system": _V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": concept(codes.PLAIN_XRAY_KNEE, text="Bone loss screening of knee radiographs (automated)"),
        "subject": {"reference": refs["patient"]},
        "issued": result.reported_at.isoformat(timespec="seconds"),
        "result": [{"reference": r} for r in results],
        "imagingStudy": [{"reference": refs["study"]}],
        "conclusion": _conclusion(result),
        "extension": [
            {"url": f"{PRIVATE_CODE_SYSTEM}:revision", "valueInteger": result.revision},
        ],
    }
    if effective := _date(result.study_date):
        report["effectiveDateTime"] = effective
    return report


def _referral(result: StudyResult, dest: FhirSection, keys: _Keys, refs: dict[str, str]) -> dict[str, Any]:
    common: dict[str, Any] = {
        "identifier": [_identifier(keys.referral)],
        "intent": "proposal",
        "authoredOn": result.reported_at.isoformat(timespec="seconds"),
        "requester": {"reference": refs["device"]},
        "note": [{"text": result.disclaimer}],
    }
    reason = {"reference": refs["report"]}
    if dest.referral == "service-request":
        return {
            "reasonReference": [reason],
            "resourceType": "ServiceRequest",
            "status": "active",
            "code": concept(BONE_DENSITOMETRY, text="DXA scan (bone densitometry)"),
            "subject": {"reference": refs["patient"]},
            "supportingInfo": [{"reference": refs["study"]}],
            **common,
        }
    return {
        "resourceType": "Task",
        "status": "requested",
        "code": concept(FLS_REVIEW),
        "description": "Review for the fracture liaison service: bone loss suspected on a knee radiograph.",
        "for": {"reference": refs["patient"]},
        "focus": {"reference": refs["report"]},
        "reasonReference": reason,  # 0..1 on a Task
        **common,
    }


def bundle_dict(result: StudyResult, dest: FhirSection) -> dict[str, Any]:
    """The transaction Bundle as a dict (not yet checked against the R4 models)."""
    keys = _Keys(result, dest)
    refs = {
        "patient": _full_url("Patient", *keys.patient),
        "device": _full_url("Device", *keys.device),
        "study": _full_url("ImagingStudy", *keys.study),
        "report": _full_url("DiagnosticReport", *keys.report),
        "observation_system": keys.observation_system,
    }
    observations = _observations(result, refs)
    obs_urls = [_full_url("Observation", *key) for _, key in observations]
    entries = [
        _entry(_patient(result, keys), keys.patient),
        _entry(_device(result, keys), keys.device),
        _entry(_imaging_study(result, keys, refs["patient"]), keys.study),
        *(_entry(resource, key, update=True) for resource, key in observations),
        _entry(_diagnostic_report(result, keys, refs, obs_urls), keys.report, update=True),
    ]
    rejected = result.assessment is not None and result.assessment.verdict == "rejected"
    if result.positive and dest.referral != "none" and not rejected:
        entries.append(_entry(_referral(result, dest, keys, refs), keys.referral))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def build_bundle(result: StudyResult, dest: FhirSection) -> bytes:
    """The study's transaction Bundle for ``dest``, as UTF-8 JSON, checked against the R4 models.
    Raises BuildError (no value in its text) when the result cannot be stated in FHIR."""
    data = bundle_dict(result, dest)
    try:
        checked = Bundle(data, strict=True).as_json()
    except FHIRValidationError as exc:
        raise BuildError(f"the FHIR bundle does not conform to R4 ({_paths(exc)})") from None
    return json.dumps(checked, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _paths(exc: FHIRValidationError) -> str:
    """Where the models found fault, as element paths (the messages may quote values)."""
    paths: list[str] = []

    def walk(error: BaseException, prefix: str) -> None:
        if isinstance(error, FHIRValidationError):
            path = f"{prefix}.{error.path}" if prefix and error.path else (error.path or prefix)
            for inner in error.errors:
                walk(inner, path)
        else:
            paths.append(f"{prefix or 'Bundle'}: {error.__class__.__name__}")

    walk(exc, "")
    return "; ".join(paths[:5])
