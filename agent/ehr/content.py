"""What a message about one screened study says, read once from the study's sources and findings.

The same values the SR is built from (``reporting/source.py``: every value valid or absent, text
decoded), so the HL7 and FHIR messages can never say something the SR does not. Builders take a
``StudyResult`` and nothing else: no database, no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.domain import AlgorithmInfo, Findings, KneeFindings
from agent.reporting import equipment, uids
from agent.reporting.source import reference_dataset
from agent.reporting.sr import image_label, impression, knee_label


@dataclass(frozen=True)
class ImageResult:
    """One screened image's findings, as the SR's measurement group states them."""

    sop_instance_uid: str
    series_instance_uid: str
    label: str  # "Right knee AP": laterality, region and view in words
    laterality: str | None  # "L" | "R" | "B" | None
    view_position: str | None  # "AP" | "PA" | ... | None
    bone_loss: bool
    severity: str | None  # "osteopenia" | "osteoporosis" when bone_loss
    probability: float  # calibrated P(bone loss), 0..1
    threshold: float  # the served operating threshold, 0..1
    p_osteoporosis_given_bone_loss: float
    t_score: float  # estimated DXA T-score
    t_score_low: float
    t_score_high: float
    interval_coverage: float  # e.g. 0.9


@dataclass(frozen=True)
class KneeResult:
    """One knee of the study (its screened films of one side combined), as the SR's Knee result
    container states it. The same figure names as ``ImageResult``: the study-level observations
    read either."""

    label: str  # "Left knee", "Right knee"; "Knee": a film of unknown side, a knee of its own
    laterality: str | None  # "L" | "R" | None
    sop_instance_uids: tuple[str, ...]  # its films
    bone_loss: bool
    severity: str | None
    probability: float  # from the mean of the films' calibrated logits
    threshold: float
    p_osteoporosis_given_bone_loss: float
    t_score: float  # mean of the films' T-scores
    t_score_low: float
    t_score_high: float
    interval_coverage: float


@dataclass(frozen=True)
class Assessment:
    """A radiologist's verdict on the study's result (IHE AI Results Assessment, per study): confirmed
    when they agreed with a flagged image, rejected when they disagreed with every one."""

    verdict: str  # "confirmed" | "rejected"
    reasons: tuple[str, ...]  # the reasons given for disagreeing (free text, for the EHR only)
    at: datetime  # when the deciding verdict was recorded (aware, UTC)


@dataclass(frozen=True)
class StudyResult:
    """One study's screening result, as every message about it states it.

    Patient and study values are the sanitized ones (None when the source had no valid value).
    ``report_sop_instance_uid`` is the SR's: it identifies this revision of the result."""

    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None  # DICOM PN form: Family^Given^Middle^Prefix^Suffix
    patient_birth_date: str | None  # YYYYMMDD
    patient_sex: str | None  # "M" | "F" | "O"
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None  # YYYYMMDD
    study_time: str | None  # HHMMSS[.ffffff]
    study_description: str | None
    report_sop_instance_uid: str
    report_series_instance_uid: str
    revision: int  # 1 for the first SR of the study, then 2, 3 ... as later images arrive
    reported_at: datetime  # when this result was recorded (aware, UTC)
    positive: bool  # any knee bone_loss (without knees: any image)
    severity: str | None  # the worst severity of the positive knees (without knees: images)
    index_image: ImageResult  # the image with the highest P(bone loss)
    images: tuple[ImageResult, ...]
    impression: str  # the SR's Impression text, disclaimer included
    algorithm: AlgorithmInfo
    model_key: str  # version#sha: what the result UIDs are derived from
    device_uid: str  # the model's Device UID (= the SR's Device Observer UID)
    assessment: Assessment | None = None  # a radiologist's verdict, when the message reports one
    knees: tuple[KneeResult, ...] = ()  # the study's knees, as the SR's summary states them
    index_knee: KneeResult | None = None  # the knee with the highest P(bone loss)

    @property
    def index_result(self) -> ImageResult | KneeResult:
        """What the study-level observations state: the index knee, else (a result built
        without knees) the index image."""
        return self.index_knee if self.index_knee is not None else self.index_image

    @property
    def disclaimer(self) -> str:
        return (
            f"{self.algorithm.name} {self.algorithm.version}: automated screening estimate, not "
            "reviewed by a radiologist. Research software, NOT FOR DIAGNOSTIC USE."
        )


def _text(ds: Any, keyword: str) -> str | None:
    value = str(ds.get(keyword, "") or "").strip()
    return value or None


def _image(ds: Any, f: Findings) -> ImageResult:
    return ImageResult(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        label=image_label(ds),
        laterality=_text(ds, "ImageLaterality"),
        view_position=_text(ds, "ViewPosition"),
        bone_loss=f.bone_loss,
        severity=f.severity if f.bone_loss else None,
        probability=f.probability,
        threshold=f.threshold,
        p_osteoporosis_given_bone_loss=f.p_osteoporosis_given_bone_loss,
        t_score=f.t_score,
        t_score_low=f.t_score_low,
        t_score_high=f.t_score_high,
        interval_coverage=f.interval_coverage,
    )


def study_result(
    sources: Sequence[Any],
    findings: Sequence[Findings],
    *,
    report_sop_instance_uid: str,
    report_series_instance_uid: str,
    revision: int,
    reported_at: datetime,
    knees: Sequence[KneeFindings] | None = None,
) -> StudyResult:
    """The result of one study from its sources' headers (as received) and their findings; with
    ``knees`` (agent/pipeline/knees.py, as given to the SR) the study's result is theirs."""
    if not sources or len(sources) != len(findings):
        raise ValueError("a study result needs one finding per source, at least one")
    refs = [reference_dataset(ds) for ds in sources]
    images = tuple(_image(ds, f) for ds, f in zip(refs, findings, strict=True))
    first = refs[0]
    index = max(range(len(images)), key=lambda i: images[i].probability)
    knee_results = tuple(_knee(k, images) for k in knees or ())
    decided: Sequence[ImageResult | KneeResult] = knee_results or images
    severities = {i.severity for i in decided if i.bone_loss}
    algorithm = findings[index].algorithm
    return StudyResult(
        patient_id=_text(first, "PatientID"),
        issuer_of_patient_id=_text(first, "IssuerOfPatientID"),
        patient_name=_text(first, "PatientName"),
        patient_birth_date=_text(first, "PatientBirthDate"),
        patient_sex=_text(first, "PatientSex"),
        study_instance_uid=str(first.StudyInstanceUID),
        accession_number=_text(first, "AccessionNumber"),
        study_date=_text(first, "StudyDate"),
        study_time=_text(first, "StudyTime"),
        study_description=_text(first, "StudyDescription"),
        report_sop_instance_uid=report_sop_instance_uid,
        report_series_instance_uid=report_series_instance_uid,
        revision=revision,
        reported_at=reported_at,
        positive=any(i.bone_loss for i in decided),
        severity="osteoporosis" if "osteoporosis" in severities else ("osteopenia" if severities else None),
        index_image=images[index],
        images=images,
        impression=impression(refs, list(findings), None if knees is None else list(knees)),
        algorithm=algorithm,
        model_key=uids.model_key(algorithm),
        device_uid=equipment.device_uid(algorithm),
        knees=knee_results,
        index_knee=max(knee_results, key=lambda k: k.probability) if knee_results else None,
    )


def _knee(k: KneeFindings, images: Sequence[ImageResult]) -> KneeResult:
    return KneeResult(
        label=knee_label(k),
        laterality=k.laterality,
        sop_instance_uids=tuple(images[i].sop_instance_uid for i in k.images),
        bone_loss=k.bone_loss,
        severity=k.severity if k.bone_loss else None,
        probability=k.probability,
        threshold=k.threshold,
        p_osteoporosis_given_bone_loss=k.p_osteoporosis_given_bone_loss,
        t_score=k.t_score,
        t_score_low=k.t_score_low,
        t_score_high=k.t_score_high,
        interval_coverage=k.interval_coverage,
    )
