"""Which received instances are screened. Rules on tags only; no pixel decoding here.

An ineligible instance is still accepted and stored: it becomes a SKIPPED job with the reason
(refusing it would make PACS resend it forever).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from agent.dicom_values import patient_age_years
from agent.domain import Eligibility

SCREENED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX For Processing
        "1.2.840.10008.5.1.4.1.1.1",  # CR
    }
)


@dataclass(frozen=True)
class Rules:
    modalities: frozenset[str]
    body_parts: frozenset[str]
    anatomic_region_codes: frozenset[str]
    min_age_years: int
    max_pixels: int
    sop_classes: frozenset[str] = SCREENED_SOP_CLASSES


def _region_codes(ds: Dataset) -> set[str]:
    return {str(item.get("CodeValue", "")) for item in ds.get("AnatomicRegionSequence", [])}


def evaluate(ds: Dataset, rules: Rules) -> Eligibility:
    """Apply the rules; the first failing rule gives the reason."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in rules.sop_classes:
        return Eligibility(False, f"SOP class {sop_class} is kept but not screened (not an X-ray image)")
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in rules.modalities:
        return Eligibility(False, f"modality {modality or 'missing'} is not screened")
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    codes = _region_codes(ds)
    if body_part not in rules.body_parts and not (codes & rules.anatomic_region_codes):
        shown = body_part or "missing"
        return Eligibility(False, f"body part {shown} is not a knee (no knee anatomic region code)")
    age = patient_age_years(ds)
    if age is not None and age < rules.min_age_years:
        return Eligibility(False, f"patient younger than {rules.min_age_years} years")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > rules.max_pixels:
        return Eligibility(False, f"image of {rows}x{cols} pixels exceeds the decoding limit")
    if rows < 64 or cols < 64:
        return Eligibility(False, f"image of {rows}x{cols} pixels is too small to screen")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return Eligibility(False, "not a grayscale image")
    return Eligibility(True)
