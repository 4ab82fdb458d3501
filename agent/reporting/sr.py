"""The study's screening report: a TID 1500 Measurement Report in a Comprehensive 3D SR.

One planar ROI group (TID 1410) per screened image: its image region is the square the model
assessed (a closed POLYLINE on the source image), and the first measurement is INFERRED FROM the
same region, which is what image viewers need to draw it (OHIF v3 hydrates exactly this shape as
a rectangle labelled with the finding; docs/viewing-results.md). The study summary (the result
and severity of the study's knees, a plain-text impression, one Knee result container per knee:
the films of one side combined, agent/pipeline/knees.py) sits in the document's Qualitative
Evaluations container (TID 1500 row 12), not in a measurement group: a group without an image
region stops OHIF loading the whole report.
Every container is SEPARATE, so text renderers (dsr2html) print each value with its name.

Evidence = the source images, so the SR lands in the source study with the patient and study
modules copied (as reporting/source.py reads them: normalised, or left empty where a value cannot
be read; UTF-8). UNVERIFIED / PRELIMINARY (highdicom's defaults), Contributing Equipment and the
observer device name the model (reporting/equipment.py, IHE AIR), and every UID is derived
(reporting/uids.py), so a rebuilt report is the same instance to PACS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes as std
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

from agent.compat import highdicom_internals, warn_once
from agent.dicom_values import read_positive_int, value_of
from agent.domain import AlgorithmInfo, Findings, KneeFindings
from agent.logging import get_logger
from agent.reporting import codes
from agent.reporting.equipment import contributing_equipment, device_uid, identify, model_name
from agent.reporting.source import reference_dataset
from agent.reporting.uids import model_key, result_uid, sr_input
from agent.reporting.wording import percent_pair, probability_pair, t_score

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
#: image lines in the Impression before "n more normal images not listed" (positives always listed)
IMPRESSION_IMAGES = 12


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
    now: datetime | None = None,
    knees: Sequence[KneeFindings] | None = None,
) -> Dataset:
    """Build the screening SR of one study.

    Parameters
    ----------
    sources
        The screened images (datasets with patient/study modules), all of one study. The SR copies
        their values as ``reference_dataset`` reads them (agent/reporting/source.py), never as is.
    findings
        STR-Net's answer per image, in the order of ``sources``; ``region`` is drawn as the
        assessed square (the whole image when it is None).
    revision
        1 for the first report of the study, +1 for each later one (late instances).
    predecessor
        (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of the report this one replaces;
        referenced in PredecessorDocumentsSequence so nothing is silently overwritten.
    now
        When the report is made (local time, as DICOM dates are): Series and Content Date/Time.
    knees
        The study's knees (its films of one side combined, agent/pipeline/knees.py), their
        ``images`` indices into ``findings``: the study summary's result follows them (positive
        when a knee is) and states each knee. None: no knee items, the result is the images'.

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
    _check_knees(knees, len(findings))
    now = (now or datetime.now()).replace(microsecond=0)
    # what the SR copies (patient, study, equipment) and references (the images' UIDs), each value
    # read leniently: a value the hospital sent can never make the SR invalid (reporting/source.py)
    refs = [reference_dataset(ds) for ds in sources]
    algorithm = findings[0].algorithm
    version = algorithm.version
    key = model_key(algorithm)  # new weights under the same version string: new objects
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=version,
        parameters=[f"checkpoint_sha256={algorithm.checkpoint_sha256}"],
    )

    groups = [_image_group(ds, f, algorithm_id, key) for ds, f in zip(refs, findings, strict=True)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm, manufacturer),
        procedure_reported=codes.PLAIN_XRAY_KNEE,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    previous = [_predecessor_ref(*predecessor)] if predecessor is not None else None
    root = report[0]
    root.ContentSequence.append(_study_summary(refs, findings, knees))
    _separate(root)
    # highdicom deep-copies the content to parse the copy for its ``content`` property (a third of
    # the build: 80 of 265 ms for a three-image study). This tree is built for this SR alone and
    # never used again, so it may be parsed in place: the encoded SR is the same to the byte
    # (tests/unit/test_reporting.py). After the block the SR's content copies normally.
    in_place = highdicom_internals.keep_content_uncopied(root) if PARSE_IN_PLACE else nullcontext(None)
    with in_place as kept:
        sr = hd.sr.Comprehensive3DSR(
            evidence=refs,
            content=root,
            series_instance_uid=result_uid(study_uid, key, "sr-series"),
            series_number=series_number,
            sop_instance_uid=result_uid(sr_input(study_uid, revision), key, "sr"),
            instance_number=instance_number,
            manufacturer=manufacturer,
            previous_versions=previous,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=DESCRIPTION,
            contributing_equipment=[contributing_equipment(algorithm, manufacturer, now)],
            content_date=now.date(),
            content_time=now.time(),
            series_date=now.date(),
            series_time=now.time(),
        )
    if kept is not None and (missing := kept.missing()) is not None:  # highdicom copied another way
        warn_once(log, missing)
    identify(sr, algorithm)
    # SOP Common: declare our private coding scheme so a reader can tell whose codes these are.
    sr.CodingSchemeIdentificationSequence = [codes.coding_scheme_identification()]
    return sr


def _num(value: float, ndigits: int) -> float:
    # DS holds 16 characters; rounding also keeps the values as readable as the overlay's.
    return round(float(value), ndigits)


def _percent(value: float) -> float:
    """A probability in [0, 1] as a percentage (what a reader sees in a viewer's measurement
    label: "Probability: 87.31 %", not "0.87 1"), to 4 decimals: a probability just below the
    threshold must not read as equal to it."""
    return round(float(value) * 100.0, 4)


def _laterality(ds: Dataset) -> str | None:
    value = ds.get("ImageLaterality") or ds.get("Laterality")
    return str(value) if value in codes.LATERALITY else None


_SIDE_WORDS = {"L": "Left", "R": "Right", "B": "Both"}


def image_label(ds: Dataset) -> str:
    """What a reader calls the image: "Right knee AP", "Knee" when side and view are unknown."""
    laterality = _laterality(ds)
    view = str(ds.get("ViewPosition") or "").strip()
    side = _SIDE_WORDS.get(laterality or "")
    knee = f"{side} knee" if side and side != "Both" else ("Both knees" if side else "Knee")
    return f"{knee} {view}".strip()


def _finding_site(laterality: str | None) -> hd.sr.FindingSite:
    lat_code = codes.LATERALITY.get(laterality) if laterality else None
    return hd.sr.FindingSite(anatomic_location=codes.KNEE, laterality=lat_code)


def _assessed_square(ds: Dataset, f: Findings) -> np.ndarray:
    """The assessed square as a closed POLYLINE of (column, row) points on the source image,
    clipped to it (SCOORD pixel coordinates: (0, 0) is the top left corner of the first pixel)."""
    rows, cols = read_positive_int(value_of(ds, "Rows")), read_positive_int(value_of(ds, "Columns"))
    if rows is None or cols is None:  # never from a screened film: it was decoded
        raise ValueError("the source has no valid Rows and Columns to draw the assessed square on")
    r0, c0, r1, c1 = f.region if f.region is not None else (0, 0, rows, cols)
    r0, r1 = max(0, min(r0, rows)), max(0, min(r1, rows))
    c0, c1 = max(0, min(c0, cols)), max(0, min(c1, cols))
    if r1 <= r0 or c1 <= c0:  # a region outside the image (never from the model): the whole image
        r0, c0, r1, c1 = 0, 0, rows, cols
    corners = [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]
    return np.array(corners, dtype=np.float32)


def _region_source(ds: Dataset) -> hd.sr.SourceImageForRegion:
    # No Referenced Frame Number, even for a source with NumberOfFrames > 1 (screened on its first
    # frame): DX and CR are single-frame SOP classes, and dciodvfy refuses a frame number for them.
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(ds.SOPClassUID), referenced_sop_instance_uid=str(ds.SOPInstanceUID)
    )


def _image_group(
    ds: Dataset, f: Findings, algorithm_id: hd.sr.AlgorithmIdentification, key: str
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group for one screened image, its region the assessed square."""
    laterality = _laterality(ds)
    severity = _severity_code(f)
    square = _assessed_square(ds, f)
    qualitative = [
        hd.sr.QualitativeEvaluation(
            codes.SCREENING_RESULT, codes.BONE_LOSS_SUSPECTED if f.bone_loss else codes.NORMAL
        )
    ]
    if severity is not None:
        qualitative.append(hd.sr.QualitativeEvaluation(codes.SEVERITY, severity))
    t = _num(f.t_score, 2)
    lo, hi = _num(f.t_score_low, 2), _num(f.t_score_high, 2)
    # The order is what a viewer shows: OHIF labels a drawn region with its first five numbers,
    # and takes the region to track from the first one's INFERRED FROM coordinates.
    measurements = [
        hd.sr.Measurement(
            codes.PROBABILITY,
            _percent(f.probability),
            codes.UNIT_PERCENT,
            method=codes.P_BONE_LOSS_METHOD,
        ),
        hd.sr.Measurement(
            codes.ESTIMATED_T_SCORE,
            t,
            codes.UNIT_T_SCORE,
            # TID 310's standard uncertainty range, for consumers that know no private code.
            properties=_uncertainty(_num(hi - t, 2), _num(t - lo, 2), codes.UNIT_T_SCORE),
        ),
        hd.sr.Measurement(codes.T_SCORE_LOWER, lo, codes.UNIT_T_SCORE),
        hd.sr.Measurement(codes.T_SCORE_UPPER, hi, codes.UNIT_T_SCORE),
        hd.sr.Measurement(codes.THRESHOLD, _percent(f.threshold), codes.UNIT_PERCENT),
        hd.sr.Measurement(codes.P_OSTEOPOROSIS, _percent(f.p_osteoporosis_given_bone_loss), codes.UNIT_PERCENT),
        hd.sr.Measurement(codes.INTERVAL_COVERAGE, _percent(f.interval_coverage), codes.UNIT_PERCENT),
    ]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(str(ds.SOPInstanceUID), key, "group"),
            identifier=image_label(ds),
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=square,
            source_image=_region_source(ds),
        ),
        finding_type=severity or (codes.BONE_LOSS_SUSPECTED if f.bone_loss else codes.NORMAL),
        algorithm_id=algorithm_id,
        finding_sites=[_finding_site(laterality)],
        measurements=measurements,
        qualitative_evaluations=qualitative,
    )
    # The probability is INFERRED FROM the same region (TID 300 row 8, TID 320). highdicom's
    # TID 1410 takes no coordinates on its measurements, so they are added to the built item;
    # OHIF v3 tracks a group only when its first measurement carries them.
    probability = next(
        item
        for item in group[0].ContentSequence
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == codes.PROBABILITY.value
    )
    probability.ContentSequence.append(
        hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=square,
            source_image=_region_source(ds),
        )
    )
    return group


def _check_knees(knees: Sequence[KneeFindings] | None, n: int) -> None:
    if knees is None:
        return
    seen: list[int] = []
    for k, knee in enumerate(knees):
        if not knee.images or any(not 0 <= i < n for i in knee.images):
            raise ValueError(f"knees[{k}] names no image or one outside the findings")
        seen += knee.images
        for field in _NUMERIC_FIELDS:
            if not math.isfinite(getattr(knee, field)):
                raise ValueError(f"knees[{k}].{field} is not finite")
    if sorted(seen) != list(range(n)):
        raise ValueError("knees must name every image once")


def _study_summary(
    sources: Sequence[Dataset], findings: Sequence[Findings], knees: Sequence[KneeFindings] | None = None
) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations: the study's result (positive if a knee is; without
    knees, if an image is), the worst severity, the impression in words, which names the index
    image (the highest P(bone loss)) with its estimated T-score and interval, then one Knee
    result container per knee."""
    decided: Sequence[Findings | KneeFindings] = findings if knees is None else knees
    positive = any(f.bone_loss for f in decided)
    severities = [s for s in (_severity_code(f) for f in decided) if s is not None]
    worst = (
        codes.OSTEOPOROSIS
        if codes.OSTEOPOROSIS in severities
        else (codes.OSTEOPENIA if severities else None)
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.SCREENING_RESULT,
            value=codes.BONE_LOSS_SUSPECTED if positive else codes.NORMAL,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    if worst is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=codes.SEVERITY, value=worst, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    items.append(
        hd.sr.TextContentItem(
            name=codes.IMPRESSION,
            value=impression(sources, findings, knees),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    items += [_knee_item(knee) for knee in knees or ()]
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def knee_label(knee: KneeFindings) -> str:
    """"Left knee", "Right knee"; "Knee" for a film of unknown side (a knee of its own)."""
    side = _SIDE_WORDS.get(knee.laterality or "")
    return f"{side} knee" if side in ("Left", "Right") else "Knee"


def knee_statement(knee: KneeFindings) -> str:
    """One knee in words: "Left knee, 2 images: bone loss suspected (osteopenia), probability of
    bone loss 72 %, osteoporosis given bone loss 40 %, estimated T-score -2.3 (90% interval -3.1
    to -1.5)"."""
    n = len(knee.images)
    p, _ = percent_pair(knee.probability, knee.threshold)
    q = f"{knee.p_osteoporosis_given_bone_loss * 100:.0f} %"
    verdict = "bone loss suspected" if knee.bone_loss else "normal"
    if knee.bone_loss and knee.severity:
        verdict += f" ({knee.severity})"
    return (
        f"{knee_label(knee)}, {n} image{'s' if n != 1 else ''}: {verdict}, probability of bone loss {p}, "
        f"osteoporosis given bone loss {q}, estimated T-score {t_score(knee.t_score)} "
        f"({knee.interval_coverage:.0%} interval {t_score(knee.t_score_low)} to {t_score(knee.t_score_high)})"
    )


def _num_item(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name, value=value, unit=unit, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _knee_item(knee: KneeFindings) -> hd.sr.ContainerContentItem:
    """One knee of the study summary: its site and side, how many films it combines, its result
    and severity, P(bone loss), P(osteoporosis | bone loss), the estimated T-score with its
    interval, and the knee in words (``knee_statement``)."""
    t = _num(knee.t_score, 2)
    lo, hi = _num(knee.t_score_low, 2), _num(knee.t_score_high, 2)
    probability = _num_item(codes.PROBABILITY, _percent(knee.probability), codes.UNIT_PERCENT)
    probability.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=codes.MEASUREMENT_METHOD,
                value=codes.P_BONE_LOSS_METHOD,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        ]
    )
    items: list[hd.sr.ContentItem] = [
        _finding_site(knee.laterality),
        _num_item(codes.KNEE_IMAGES, len(knee.images), codes.UNIT_IMAGES),
        hd.sr.CodeContentItem(
            name=codes.SCREENING_RESULT,
            value=codes.BONE_LOSS_SUSPECTED if knee.bone_loss else codes.NORMAL,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    severity = _severity_code(knee)
    if severity is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=codes.SEVERITY, value=severity, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    items += [
        probability,
        _num_item(codes.THRESHOLD, _percent(knee.threshold), codes.UNIT_PERCENT),
        _num_item(codes.P_OSTEOPOROSIS, _percent(knee.p_osteoporosis_given_bone_loss), codes.UNIT_PERCENT),
        _num_item(codes.ESTIMATED_T_SCORE, t, codes.UNIT_T_SCORE),
        _num_item(codes.T_SCORE_LOWER, lo, codes.UNIT_T_SCORE),
        _num_item(codes.T_SCORE_UPPER, hi, codes.UNIT_T_SCORE),
        _num_item(codes.INTERVAL_COVERAGE, _percent(knee.interval_coverage), codes.UNIT_PERCENT),
        hd.sr.TextContentItem(
            name=codes.IMPRESSION,
            value=knee_statement(knee) + ".",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    container = hd.sr.ContainerContentItem(
        name=codes.KNEE_RESULT, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def impression(
    sources: Sequence[Dataset], findings: Sequence[Findings], knees: Sequence[KneeFindings] | None = None
) -> str:
    """The report in words, as a text renderer or a reader without a viewer sees it: the study's
    result with its index image (the highest probability of bone loss), with knees the study's
    knee-level result and one line per knee (``knee_statement``), one line per image with the
    positive ones first, the model and the disclaimer. Numbers print as on the overlay's
    banner (agent/reporting/wording.py). At most ``IMPRESSION_IMAGES`` image lines: a longer
    study says how many are left out, never a positive one."""
    positive = [i for i, f in enumerate(findings) if f.bone_loss]
    index = max(range(len(findings)), key=lambda i: findings[i].probability)
    top = findings[index]
    algorithm = top.algorithm
    p, threshold = probability_pair(top.probability, top.threshold)
    n = len(findings)
    result = f"Bone loss suspected in {len(positive)} of {n}" if positive else f"No bone loss detected in {n}"
    lines = [
        f"{result} screened image{'s' if n != 1 else ''}. Highest probability of bone loss {p} "
        f"({image_label(sources[index])}), threshold {threshold}; its estimated T-score "
        f"{t_score(top.t_score)}, {top.interval_coverage:.0%} interval {t_score(top.t_score_low)} "
        f"to {t_score(top.t_score_high)}."
    ]
    if knees is not None:
        up = sum(k.bone_loss for k in knees)
        lines.append(
            f"Per knee: bone loss suspected in {up} of {len(knees)} knee{'s' if len(knees) != 1 else ''}."
            if up
            else f"Per knee: no bone loss detected in {len(knees)} knee{'s' if len(knees) != 1 else ''}."
        )
        lines += [knee_statement(k) + "." for k in knees]
    order = positive + [i for i in range(n) if not findings[i].bone_loss]
    shown = order if len(order) <= IMPRESSION_IMAGES else order[: max(IMPRESSION_IMAGES, len(positive))]
    for i in shown:
        ds, f = sources[i], findings[i]
        severity = f" ({f.severity})" if f.bone_loss and f.severity else ""
        p, _ = probability_pair(f.probability, f.threshold)
        lines.append(
            f"{image_label(ds)}: {'bone loss suspected' if f.bone_loss else 'normal'}{severity}, "
            f"P {p}, T-score {t_score(f.t_score)} [{t_score(f.t_score_low)}, {t_score(f.t_score_high)}]."
        )
    if len(shown) < n:
        lines.append(f"{n - len(shown)} more normal image{'s' if n - len(shown) != 1 else ''} not listed.")
    lines.append(
        f"{algorithm.name} {algorithm.version}, not reviewed by a radiologist. "
        "Research software, NOT FOR DIAGNOSTIC USE."
    )
    return "\n".join(lines)


def _separate(item: Dataset) -> None:
    """Every container SEPARATE: its items are separate statements, and text renderers print
    each with its name (highdicom writes CONTINUOUS: dsr2html then ran the values together)."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


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


def _severity_code(f: Findings | KneeFindings) -> Code | None:
    if not f.bone_loss or f.severity is None:
        return None
    severity = f.severity.lower()
    if severity == "osteopenia":
        return codes.OSTEOPENIA
    if severity == "osteoporosis":
        return codes.OSTEOPOROSIS
    raise ValueError(f"severity must be 'osteopenia' or 'osteoporosis', not {f.severity!r}")


def _observation_context(algorithm: AlgorithmInfo, manufacturer: str) -> hd.sr.ObservationContext:
    # The observer is the model (a device), not a person: nobody has read this report. The same
    # Device UID and model name as the Contributing Equipment item (IHE AIR).
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=manufacturer,
        model_name=model_name(algorithm),
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
