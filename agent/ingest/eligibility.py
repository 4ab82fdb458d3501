"""Which received instances are screened. Rules on tags only; no pixel decoding here (a blank
film is found after decoding: agent/pipeline/load.py).

An ineligible instance is still accepted and stored: it becomes a SKIPPED job with the reason
(refusing it would make PACS resend it forever). Reasons are stable strings that name the rule,
never an element value (the SOP Class UID and the image's size excepted); values are read as
agent/dicom_values.py reads them (docs/dicom-values.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from agent.config import EligibilitySection
from agent.dicom_values import patient_age_years, read_cs, value_of, words_of
from agent.domain import Eligibility

SCREENED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX For Processing
        "1.2.840.10008.5.1.4.1.1.1",  # CR
    }
)

# ---- the reasons (stable: tests and the admin's filters match them) ----------------------------
MODALITY_REASON = "modality not screened (not one of eligibility.modalities)"
BODY_PART_REASON = "body part is not a knee (BodyPartExamined, anatomic region code)"
GENERIC_BODY_PART_REASON = (
    "body part not specific (empty, EXTREMITY, LEG or LOWER LIMB) and no knee in the study, series "
    "or protocol description nor an anatomic region code"
)
LATERAL_REASON = "lateral view: STR-Net screens AP/PA knee films only"
OBLIQUE_REASON = "oblique view: STR-Net screens AP/PA knee films only"
NOT_GREYSCALE_REASON = "not a grayscale image"

#: BodyPartExamined values that say "somewhere on the leg": screened only when a description or
#: an anatomic region code says knee
GENERIC_BODY_PARTS = frozenset({"", "EXTREMITY", "LEG", "LOWER LIMB", "LOWERLIMB"})
#: "knee" as a word in a description, in the languages of common sites' protocol names
_KNEE_WORD = re.compile(
    r"\b(?:knee|knees|knie|knies|genou|genoux|rodilla|rodillas|ginocchio|ginocchia|joelho|joelhos)\b",
    re.IGNORECASE,
)
_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription")

#: ViewPosition values of a lateral or oblique projection (PS3.3 C.8.11.5 defined terms LL, RL,
#: LLO, RLO, RLD/LLD are decubitus: the beam may still be AP/PA, so they are screened)
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "ML", "LM", "LATERAL MEDIAL", "MEDIAL LATERAL"})
OBLIQUE_VIEWS = frozenset({"LLO", "RLO", "LAO", "RAO", "LPO", "RPO", "OBL", "OBLIQUE", "APO", "PAO"})
#: ViewCodeSequence codes (CID 4010) of a lateral or oblique projection (SNOMED CT)
LATERAL_VIEW_CODES = frozenset({"399067008", "399173006", "399198007", "399352003", "399260004", "30730003"})
OBLIQUE_VIEW_CODES = frozenset(
    {
        "260427002", "399099002", "399135007", "399184004", "399006002", "260426006", "399368009",
        "399004004", "399225005", "399288005", "399182000", "399059000", "399356000", "399236003",
        "399038007", "399312000", "399160007", "399132005", "399325008",
    }
)  # fmt: skip
#: the same in a code's meaning, for other coding schemes (SRT's R-10xxx ...)
_LATERAL_MEANING = re.compile(r"\b(?:lateral|latero|sagittal)\b", re.IGNORECASE)
_OBLIQUE_MEANING = re.compile(r"\boblique\b", re.IGNORECASE)


@dataclass(frozen=True)
class Rules:
    modalities: frozenset[str]
    body_parts: frozenset[str]
    anatomic_region_codes: frozenset[str]
    min_age_years: int
    max_pixels: int
    sop_classes: frozenset[str] = SCREENED_SOP_CLASSES

    @classmethod
    def from_section(cls, e: EligibilitySection) -> Rules:
        """The rules of the [eligibility] settings (the listener and the sweep use the same)."""
        return cls(
            modalities=frozenset(m.upper() for m in e.modalities),
            body_parts=frozenset(b.upper() for b in e.body_parts),
            anatomic_region_codes=frozenset(e.anatomic_region_codes),
            min_age_years=e.min_age_years,
            max_pixels=e.max_pixels,
        )


def _region_codes(ds: Dataset) -> set[str]:
    return {str(item.get("CodeValue", "") or "").strip() for item in _items(ds, "AnatomicRegionSequence")}


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = value_of(ds, keyword)
    return [item for item in value if isinstance(item, Dataset)] if isinstance(value, DicomSequence) else []


def knee_in_descriptions(ds: Dataset) -> bool:
    """Whether "knee" (or KNIE, GENOU, RODILLA, GINOCCHIO, JOELHO) is a word of the study, series,
    protocol or requested procedure description (underscores and carets count as spaces)."""
    for keyword in _DESCRIPTIONS:
        text = words_of(ds, keyword).replace("_", " ").replace("^", " ")
        if _KNEE_WORD.search(text):
            return True
    return False


def view_reason(ds: Dataset) -> str | None:
    """The reason a lateral or oblique view is not screened (ViewPosition, any case, trimmed; or
    a ViewCodeSequence code); None for AP, PA and a view nobody states."""
    view = read_cs(ds, "ViewPosition") or ""
    if view in LATERAL_VIEWS:
        return LATERAL_REASON
    if view in OBLIQUE_VIEWS:
        return OBLIQUE_REASON
    for item in _items(ds, "ViewCodeSequence"):
        code = str(item.get("CodeValue", "") or "").strip()
        meaning = str(item.get("CodeMeaning", "") or "")
        if code in OBLIQUE_VIEW_CODES or _OBLIQUE_MEANING.search(meaning):  # latero-medial oblique
            return OBLIQUE_REASON
        if code in LATERAL_VIEW_CODES or _LATERAL_MEANING.search(meaning):
            return LATERAL_REASON
    return None


def body_part_reason(ds: Dataset, rules: Rules) -> str | None:
    """None when the instance shows a knee: BodyPartExamined (trimmed, any case) is one of the
    rules' body parts, or an anatomic region code is a knee code, or BodyPartExamined is generic
    (``GENERIC_BODY_PARTS``) and a description says knee; else the reason."""
    body_part = read_cs(ds, "BodyPartExamined") or ""
    if body_part in rules.body_parts or _region_codes(ds) & rules.anatomic_region_codes:
        return None
    if body_part in GENERIC_BODY_PARTS:
        return None if knee_in_descriptions(ds) else GENERIC_BODY_PART_REASON
    return BODY_PART_REASON


def evaluate(ds: Dataset, rules: Rules) -> Eligibility:
    """Apply the rules; the first failing rule gives the reason."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in rules.sop_classes:
        return Eligibility(False, f"SOP class {sop_class} is kept but not screened (not an X-ray image)")
    if (read_cs(ds, "Modality") or "") not in rules.modalities:
        return Eligibility(False, MODALITY_REASON)
    reason = body_part_reason(ds, rules) or view_reason(ds)
    if reason is not None:
        return Eligibility(False, reason)
    age = patient_age_years(ds)  # unknown (absent, 000Y, unreadable) is screened
    if age is not None and age < rules.min_age_years:
        return Eligibility(False, f"patient younger than {rules.min_age_years} years")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > rules.max_pixels:
        return Eligibility(False, f"image of {rows}x{cols} pixels exceeds the decoding limit")
    if rows < 64 or cols < 64:
        return Eligibility(False, f"image of {rows}x{cols} pixels is too small to screen")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return Eligibility(False, NOT_GREYSCALE_REASON)
    return Eligibility(True)
