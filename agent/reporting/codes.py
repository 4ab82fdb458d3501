"""Every coded concept the SR and the overlay use, in one place (docs/sr-content.md lists them).

Standard codes (SCT = SNOMED CT, DCM = DICOM PS3.16, UCUM units) wherever the standard has the
concept; private codes only where it has none, under our own coding scheme designator
``99STRNET`` (PS3.3 8.2: a designator starting with "99" is private). dciodvfy warns once per
private code; that is expected. docs/sr-content.md lists them all with the content tree.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.sr.coding import Code

SCHEME = "99STRNET"

# ---- standard: values of the findings -----------------------------------------------------------

NORMAL = Code("17621005", "SCT", "Normal")  # CID 222 Normality; screening negative
OSTEOPENIA = Code("312894000", "SCT", "Osteopenia")  # the disorder, severity class 1
OSTEOPOROSIS = Code("64859006", "SCT", "Osteoporosis")  # the disorder, severity class 2
MAXIMUM = Code("56851009", "SCT", "Maximum")  # CID 7464 derivation: the study summary's max

# ---- standard: concept names ------------------------------------------------------------------

FINDING = Code("121071", "DCM", "Finding")  # TID 1410 row "Finding" (highdicom finding_type)
IMPRESSION = Code("121073", "DCM", "Impression")  # the report's plain-text statement
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
IMAGE_REGION = Code("111030", "DCM", "Image Region")  # TID 1410 row 7, the assessed square
SEVERITY = Code("246112005", "SCT", "Severity")  # SNOMED attribute; value Osteopenia/Osteoporosis
PROBABILITY = Code("122157", "DCM", "Probability")  # calibrated P(bone loss), unit 1
THRESHOLD = Code("122411", "DCM", "Threshold Value")  # the served operating threshold, unit 1

# ---- standard: anatomy, laterality, procedure, title ------------------------------------------

# Finding site. SCT 72696002 is "Knee" (the region, CID 4031, what DX images carry in
# AnatomicRegionSequence and what the ingest rules accept); bone loss is in the femur and tibia
# around the joint, so the region fits better than SCT 49076000 "Knee joint" (the articulation).
KNEE = Code("72696002", "SCT", "Knee")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
BILATERAL = Code("51440002", "SCT", "Bilateral")
LATERALITY = {"L": LEFT, "R": RIGHT, "B": BILATERAL}  # DICOM (Image)Laterality -> CID 244

# Procedure reported (TID 1500 row 6; CID 100 is extensible and lists no plain-film procedure).
PLAIN_XRAY_KNEE = Code("74016001", "SCT", "Plain X-ray of knee")
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")  # CID 7021 (highdicom default)

# ---- units (UCUM) -----------------------------------------------------------------------------

UNIT_PERCENT = Code("%", "UCUM", "percent")  # probabilities, threshold, interval coverage
UNIT_T_SCORE = Code("{T-score}", "UCUM", "T-score")  # UCUM annotation: dimensionless, labelled

# ---- private (99STRNET): no standard concept exists -------------------------------------------

# Concept name of the per-image and per-study screening decision (probability >= threshold).
SCREENING_RESULT = Code("SCREEN-RESULT", SCHEME, "Bone loss screening result")
# Value of SCREENING_RESULT when positive: a screening suspicion from a radiograph, NOT a measured
# bone density; SCT "Bone density below reference range" would claim a DXA result, so private.
BONE_LOSS_SUSPECTED = Code("BONE-LOSS", SCHEME, "Bone loss suspected")
# The model's estimate of the DXA T-score from the radiograph (no DXA was done).
ESTIMATED_T_SCORE = Code("T-SCORE-EST", SCHEME, "Estimated T-score")
# Bounds and nominal coverage of the split-conformal interval around the estimated T-score.
T_SCORE_LOWER = Code("T-SCORE-LO", SCHEME, "Estimated T-score lower bound")
T_SCORE_UPPER = Code("T-SCORE-HI", SCHEME, "Estimated T-score upper bound")
INTERVAL_COVERAGE = Code("T-SCORE-COV", SCHEME, "Estimated T-score interval nominal coverage")
# Measurement Method of DCM 122157 "Probability": says what it is the probability of (beside a
# Finding "Osteopenia", a bare "Probability" reads as P(osteopenia)).
P_BONE_LOSS_METHOD = Code("P-BONE-LOSS", SCHEME, "Calibrated probability of bone loss (screening head)")
# P(osteoporosis | bone loss) from the severity head; DCM 122157 is already the bone-loss one.
P_OSTEOPOROSIS = Code("P-OSTEOPOROSIS", SCHEME, "Probability of osteoporosis given bone loss")
# The per-knee result of a study (the films of one side combined, model/knee.py): a container
# in the study summary, and the number of films it combines.
KNEE_RESULT = Code("KNEE-RESULT", SCHEME, "Knee result")
KNEE_IMAGES = Code("KNEE-IMAGES", SCHEME, "Number of screened images of the knee")
UNIT_IMAGES = Code("{images}", "UCUM", "images")  # UCUM annotation: a count, labelled
MEASUREMENT_METHOD = Code("370129005", "SCT", "Measurement Method")  # as TID 1410's measurements


def coding_scheme_identification() -> Dataset:
    """An item of CodingSchemeIdentificationSequence (0008,0110) declaring ``99STRNET``."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "strnet-agent private codes (see docs/sr-content.md)"
    item.CodingSchemeResponsibleOrganization = "strnet-agent project"
    return item
