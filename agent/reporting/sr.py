"""The study's screening report: a TID 1500 Measurement Report in a Comprehensive 3D SR.

One measurement group (TID 1501) per screened image, referencing it, plus
one study-level summary group; evidence = the source images, so the SR lands in the source study
with the patient and study modules copied (as reporting/source.py reads them: normalised, or left
empty where a value cannot be read; UTF-8). UNVERIFIED / PRELIMINARY (highdicom's defaults), and
every UID derived (reporting/uids.py), so a rebuilt report is the same instance to PACS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes as std
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from agent.compat import highdicom_internals, warn_once
from agent.domain import Findings
from agent.logging import get_logger
from agent.reporting import codes
from agent.reporting.source import reference_dataset
from agent.reporting.uids import result_uid, sr_input

log = get_logger(__name__)

_NUMERIC_FIELDS = (
    "probability",
    "threshold",
    "p_osteoporosis_given_bone_loss",
    "t_score",
    "t_score_low",
    "t_score_high",
    "interval_coverage",
)
DESCRIPTION = "STR-Net bone-loss screening (research, NOT FOR DIAGNOSTIC USE)"


#: skip highdicom's deep copy of the content tree (build_sr); off only to compare the two in a test
PARSE_IN_PLACE = True


def build_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Findings],
    *,
    revision: int = 1,
    predecessor: tuple[str, str, str] | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
    manufacturer: str = "strnet-agent",
) -> Dataset:
    """Build the screening SR of one study.

    Parameters
    ----------
    sources
        The screened images (datasets with patient/study modules), all of one study. The SR copies
        their values as ``reference_dataset`` reads them (agent/reporting/source.py), never as is.
    findings
        STR-Net's answer per image, in the order of ``sources``.
    revision
        1 for the first report of the study, +1 for each later one (late instances).
    predecessor
        (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of the report this one replaces;
        referenced in PredecessorDocumentsSequence so nothing is silently overwritten.

    Raises
    ------
    ValueError
        Empty or mismatched inputs, several studies, or findings of several model versions.
    """
    if not sources:
        raise ValueError("sources must not be empty")
    if len(sources) != len(findings):
        raise ValueError(f"{len(sources)} sources but {len(findings)} findings")
    study_uid = str(sources[0].StudyInstanceUID)
    if any(str(ds.StudyInstanceUID) != study_uid for ds in sources):
        raise ValueError("sources must all have the same StudyInstanceUID")
    algorithms = {f.algorithm for f in findings}
    if len(algorithms) != 1:
        raise ValueError("findings must all come from the same algorithm (name, version, hash)")
    if predecessor is not None and (len(predecessor) != 3 or predecessor[0] != study_uid):
        raise ValueError("predecessor must be (study UID of these sources, series UID, SOP UID)")
    for i, f in enumerate(findings):
        for field in _NUMERIC_FIELDS:
            if not math.isfinite(getattr(f, field)):  # NaN would reach PACS as a number
                raise ValueError(f"findings[{i}].{field} is not finite")
    # what the SR copies (patient, study, equipment) and references (the images' UIDs), each value
    # read leniently: a value the hospital sent can never make the SR invalid (reporting/source.py)
    refs = [reference_dataset(ds) for ds in sources]
    algorithm = findings[0].algorithm
    version = algorithm.version
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=version,
        parameters=[f"checkpoint_sha256={algorithm.checkpoint_sha256}"],
    )

    groups = [
        _image_group(ds, f, algorithm_id, version) for ds, f in zip(refs, findings, strict=True)
    ]
    groups.append(_summary_group(refs, findings, algorithm_id, version, study_uid, revision))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm.name, version, manufacturer),
        procedure_reported=codes.PLAIN_XRAY_KNEE,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    previous = [_predecessor_ref(*predecessor)] if predecessor is not None else None
    root = report[0]
    # highdicom deep-copies the content to parse the copy for its ``content`` property (a third of
    # the build: 80 of 265 ms for a three-image study). This tree is built for this SR alone and
    # never used again, so it may be parsed in place: the encoded SR is the same to the byte
    # (tests/unit/test_reporting.py). After the block the SR's content copies normally.
    in_place = highdicom_internals.keep_content_uncopied(root) if PARSE_IN_PLACE else nullcontext(None)
    with in_place as kept:
        sr = hd.sr.Comprehensive3DSR(
            evidence=refs,
            content=root,
            series_instance_uid=result_uid(study_uid, version, "sr-series"),
            series_number=series_number,
            sop_instance_uid=result_uid(sr_input(study_uid, revision), version, "sr"),
            instance_number=instance_number,
            manufacturer=manufacturer,
            previous_versions=previous,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=DESCRIPTION,
        )
    if kept is not None and (missing := kept.missing()) is not None:  # highdicom copied another way
        warn_once(log, missing)
    # SOP Common: declare our private coding scheme so a reader can tell whose codes these are.
    sr.CodingSchemeIdentificationSequence = [codes.coding_scheme_identification()]
    return sr


def _num(value: float, ndigits: int) -> float:
    # DS holds 16 characters; rounding also keeps the values as readable as the overlay's.
    return round(float(value), ndigits)


def _laterality(ds: Dataset) -> str | None:
    value = ds.get("ImageLaterality") or ds.get("Laterality")
    return str(value) if value in codes.LATERALITY else None


def _finding_site(laterality: str | None) -> hd.sr.FindingSite:
    lat_code = codes.LATERALITY.get(laterality) if laterality else None
    return hd.sr.FindingSite(anatomic_location=codes.KNEE, laterality=lat_code)


def _image_group(
    ds: Dataset, f: Findings, algorithm_id: hd.sr.AlgorithmIdentification, version: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one screened image."""
    laterality = _laterality(ds)
    view = str(ds.get("ViewPosition") or "").strip()
    label = " ".join(x for x in ("Knee", laterality or "", view) if x)
    severity = _severity_code(f)
    qualitative = [
        hd.sr.QualitativeEvaluation(
            codes.SCREENING_RESULT, codes.BONE_LOSS_SUSPECTED if f.bone_loss else codes.NORMAL
        )
    ]
    if severity is not None:
        qualitative.append(hd.sr.QualitativeEvaluation(codes.SEVERITY, severity))
    t = _num(f.t_score, 2)
    lo, hi = _num(f.t_score_low, 2), _num(f.t_score_high, 2)
    measurements = [
        hd.sr.Measurement(codes.PROBABILITY, _num(f.probability, 4), codes.UNIT_ONE, method=codes.P_BONE_LOSS_METHOD),
        hd.sr.Measurement(codes.THRESHOLD, _num(f.threshold, 4), codes.UNIT_ONE),
        hd.sr.Measurement(codes.P_OSTEOPOROSIS, _num(f.p_osteoporosis_given_bone_loss, 4), codes.UNIT_ONE),
        hd.sr.Measurement(
            codes.ESTIMATED_T_SCORE,
            t,
            codes.UNIT_T_SCORE,
            # TID 310's standard uncertainty range, for consumers that know no private code.
            properties=_uncertainty(_num(hi - t, 2), _num(t - lo, 2), codes.UNIT_T_SCORE),
        ),
        hd.sr.Measurement(codes.T_SCORE_LOWER, lo, codes.UNIT_T_SCORE),
        hd.sr.Measurement(codes.T_SCORE_UPPER, hi, codes.UNIT_T_SCORE),
        hd.sr.Measurement(codes.INTERVAL_COVERAGE, _num(f.interval_coverage, 4), codes.UNIT_ONE),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(str(ds.SOPInstanceUID), version, "group"),
            identifier=label,
        ),
        finding_type=severity or (codes.BONE_LOSS_SUSPECTED if f.bone_loss else codes.NORMAL),
        algorithm_id=algorithm_id,
        finding_sites=[_finding_site(laterality)],
        measurements=measurements,
        qualitative_evaluations=qualitative,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
    )


def _summary_group(
    sources: Sequence[Dataset],
    findings: Sequence[Findings],
    algorithm_id: hd.sr.AlgorithmIdentification,
    version: str,
    study_uid: str,
    revision: int,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Study-level summary: any image positive, the worst severity, the maximum probability.

    No source images: TID 1501 then means "all images in the document", i.e. the study.
    """
    positive = any(f.bone_loss for f in findings)
    severities = [s for s in (_severity_code(f) for f in findings) if s is not None]
    worst = (
        codes.OSTEOPOROSIS
        if codes.OSTEOPOROSIS in severities
        else (codes.OSTEOPENIA if severities else None)
    )
    qualitative = [
        hd.sr.QualitativeEvaluation(
            codes.SCREENING_RESULT, codes.BONE_LOSS_SUSPECTED if positive else codes.NORMAL
        )
    ]
    if worst is not None:
        qualitative.append(hd.sr.QualitativeEvaluation(codes.SEVERITY, worst))
    # The site of a positive summary is the positive knees only; of a negative one, all screened.
    relevant = [ds for ds, f in zip(sources, findings, strict=True) if f.bone_loss or not positive]
    sides = {lat for lat in (_laterality(ds) for ds in relevant) if lat is not None}
    side = "B" if {"L", "R"} <= sides or "B" in sides else (sides.pop() if sides else None)
    max_probability = max(f.probability for f in findings)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(sr_input(study_uid, revision), version, "summary"),
            identifier="Study summary",
        ),
        finding_type=worst or (codes.BONE_LOSS_SUSPECTED if positive else codes.NORMAL),
        algorithm_id=algorithm_id,
        finding_sites=[_finding_site(side)],
        measurements=[
            hd.sr.Measurement(
                codes.PROBABILITY,
                _num(max_probability, 4),
                codes.UNIT_ONE,
                method=codes.P_BONE_LOSS_METHOD,
                derivation=codes.MAXIMUM,
            )
        ],
        qualitative_evaluations=qualitative,
    )


def _uncertainty(upper: float, lower: float, unit: Code) -> hd.sr.MeasurementProperties:
    """TID 310's +/- range of measurement uncertainty, in the measurement's own unit (highdicom
    writes both ranges with "no units", which would make a T-score's range a bare number)."""
    props = hd.sr.MeasurementProperties(upper_measurement_uncertainty=upper, lower_measurement_uncertainty=lower)
    for item in props:
        if item.ValueType == "NUM":
            item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence = [
                hd.sr.CodedConcept(unit.value, unit.scheme_designator, unit.meaning)
            ]
    return props


def _severity_code(f: Findings) -> Code | None:
    if not f.bone_loss or f.severity is None:
        return None
    severity = f.severity.lower()
    if severity == "osteopenia":
        return codes.OSTEOPENIA
    if severity == "osteoporosis":
        return codes.OSTEOPOROSIS
    raise ValueError(f"severity must be 'osteopenia' or 'osteoporosis', not {f.severity!r}")


def _observation_context(name: str, version: str, manufacturer: str) -> hd.sr.ObservationContext:
    # The observer is the model (a device), not a person: nobody has read this report.
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(name, version, "device"),
        name=name,
        manufacturer_name=manufacturer,
        model_name=f"{name} {version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=std.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def _predecessor_ref(study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    # highdicom reads only these four attributes of a previous version; our SRs are all 3D SR.
    ref = Dataset()
    ref.SOPClassUID = Comprehensive3DSRStorage
    ref.SOPInstanceUID = sop_uid
    ref.StudyInstanceUID = study_uid
    ref.SeriesInstanceUID = series_uid
    return ref
