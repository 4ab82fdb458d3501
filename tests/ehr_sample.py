"""A screened two-film knee study as the HL7 and FHIR builders receive it (agent/ehr/content.py),
built from synthetic DICOM headers through the same path as the SR (tests share it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from dicom_factory import knee_dx
from pydicom.uid import generate_uid

from agent.domain import AlgorithmInfo, Findings
from agent.ehr.content import StudyResult, study_result
from agent.pipeline.knees import study_knees

ALGO = AlgorithmInfo(name="STR-Net", version="0.3.1-test", checkpoint_sha256="c0ffee" * 10 + "abcd")


def findings(positive: bool = True) -> list[Findings]:
    common: dict[str, Any] = {"threshold": 0.4217, "interval_coverage": 0.9, "algorithm": ALGO}
    first = (
        Findings(0.8731, bone_loss=True, p_osteoporosis_given_bone_loss=0.71, severity="osteoporosis",
                 t_score=-2.73, t_score_low=-3.41, t_score_high=-1.96, **common)
        if positive
        else Findings(0.3011, bone_loss=False, p_osteoporosis_given_bone_loss=0.08, severity=None,
                      t_score=-0.95, t_score_low=-1.70, t_score_high=-0.21, **common)
    )
    return [
        first,
        Findings(0.1523, bone_loss=False, p_osteoporosis_given_bone_loss=0.05, severity=None,
                 t_score=-0.41, t_score_low=-1.12, t_score_high=0.33, **common),
    ]  # fmt: skip


def sources(study_uid: str | None = None, **patient: Any) -> list[Any]:
    """Right and left knee AP of one study; ``patient`` overrides header values (raw keywords)."""
    study_uid = study_uid or generate_uid()
    out = []
    for i, side in enumerate(("R", "L")):
        ds = knee_dx(study_uid=study_uid, laterality=side, seed=i, rows=64, cols=48)
        ds.ViewPosition = "AP"
        ds.PatientID = "MRN-0042"
        ds.IssuerOfPatientID = "HOSP-A"
        ds.PatientName = "Doe^Jane^Q"
        ds.PatientBirthDate = "19470312"
        ds.PatientSex = "F"
        ds.AccessionNumber = "ACC-7781"
        ds.StudyDate = "20261201"
        ds.StudyTime = "093015"
        for keyword, value in patient.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


def study(positive: bool = True, revision: int = 1, **patient: Any) -> StudyResult:
    """The study's result as the reporter makes it: with its knees (one film of each side)."""
    srcs = sources(**patient)
    fs = findings(positive)
    return study_result(
        srcs,
        fs,
        report_sop_instance_uid=generate_uid(),
        report_series_instance_uid=generate_uid(),
        revision=revision,
        reported_at=datetime(2026, 12, 1, 10, 5, 7, tzinfo=UTC),
        knees=study_knees([str(ds.ImageLaterality) for ds in srcs], fs),
    )
