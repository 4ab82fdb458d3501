"""The source image as the results see it: a fresh dataset of what highdicom copies into an SR or
an overlay, each value read through agent/dicom_values.py.

highdicom copies the patient, study and equipment attributes of the source (``evidence`` of
``Comprehensive3DSR``, ``ref_dataset`` of ``SCImage.from_ref_dataset``) and re-validates some of
them: a birth date of 25/03/1945 or a PatientSex of "male" made the build fail, and one missing
Type 2 attribute (StudyID ...) made it raise AttributeError. The results are built from this copy
instead: every value normalised or, when it cannot be read, left empty (Type 2) or left out
(Type 3), so no value the hospital sent can make a result invalid. The text is the one pydicom
decoded under the source's SpecificCharacterSet, written as UTF-8 (ISO_IR 192) whatever the
source declared. The decisions per attribute: docs/dicom-values.md.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from agent import dicom_values as dv
from agent.logging import get_logger

log = get_logger(__name__)

#: the character set of every result: the text is decoded from the source's, written as UTF-8
RESULT_CHARACTER_SET = "ISO_IR 192"

#: Type 2 text: present in the results, empty when the source has no valid value
_TYPE2_TEXT = (("PatientID", "LO"), ("AccessionNumber", "SH"), ("StudyID", "SH"))
#: Type 3 text: left out when the source has no valid value
_TYPE3_TEXT = (
    ("IssuerOfPatientID", "LO"),
    ("StudyDescription", "LO"),
    # equipment (highdicom's Contributing Equipment item for the acquisition)
    ("Manufacturer", "LO"),
    ("ManufacturerModelName", "LO"),
    ("DeviceSerialNumber", "LO"),
    ("InstitutionName", "LO"),
    ("InstitutionalDepartmentName", "LO"),
    ("InstitutionAddress", "ST"),
    ("StationName", "SH"),
)
_IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_ORIENTATION = re.compile(r"[APLRHF]{1,3}")
_DT = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?")


def reference_dataset(source: Dataset) -> Dataset:
    """A fresh dataset holding only what the results copy from ``source``, each value valid.

    The image's identity (SOP Class and Instance, Study and Series Instance UIDs) is kept as
    received (the C-STORE handler checked it): the results reference the original image. Its
    modality and size are kept too (highdicom checks that a referenced dataset is an image). On a
    Laterality that contradicts ImageLaterality, laterality is left out and ``laterality_conflict``
    logged (no values).
    """
    ref = Dataset()
    ref.SpecificCharacterSet = RESULT_CHARACTER_SET
    for keyword in _IDENTITY:
        setattr(ref, keyword, str(source.get(keyword, "") or ""))
    # Patient (Type 2 unless said)
    ref.PatientName = dv.read_pn(source, "PatientName") or ""
    ref.PatientBirthDate = dv.read_da(dv.value_of(source, "PatientBirthDate")) or ""
    ref.PatientSex = dv.read_sex(dv.value_of(source, "PatientSex"))
    # General Study
    ref.StudyDate = dv.read_da(dv.value_of(source, "StudyDate")) or ""
    ref.StudyTime = dv.read_tm(dv.value_of(source, "StudyTime")) or ""
    ref.ReferringPhysicianName = dv.read_pn(source, "ReferringPhysicianName") or ""
    for keyword, vr in _TYPE2_TEXT:
        setattr(ref, keyword, dv.read_string(source, keyword, vr) or "")
    for keyword, vr in _TYPE3_TEXT:
        value = dv.read_string(source, keyword, vr)
        if value is not None:
            setattr(ref, keyword, value)
    age = dv.read_as(dv.value_of(source, "PatientAge"))  # Patient Study, Type 3
    if age is not None:
        ref.PatientAge = age
    versions = _software_versions(source)
    if versions:
        ref.SoftwareVersions = versions
    acquired = _read_dt(dv.value_of(source, "AcquisitionDateTime"))
    if acquired is not None:
        ref.AcquisitionDateTime = acquired
    # the image: laterality, view, body part, orientation (Type 3 here; the overlay sets its own)
    side, conflict = dv.read_laterality(source)
    if conflict:
        log.warning("laterality_conflict", sop_instance_uid=ref.SOPInstanceUID)
    elif side is not None:
        ref.ImageLaterality = side
        if side in ("L", "R"):
            ref.Laterality = side
    # what highdicom checks of an image it references: its modality and pixel description
    ref.Modality = dv.read_cs(source, "Modality") or ""
    for keyword in ("Rows", "Columns", "SamplesPerPixel"):
        number = dv.read_positive_int(dv.value_of(source, keyword))
        if number is not None and number < 2**16:
            setattr(ref, keyword, number)
    for keyword in ("ViewPosition", "BodyPartExamined"):
        value = dv.read_cs(source, keyword)
        if value is not None:
            setattr(ref, keyword, value)
    orientation = _orientation(source)
    if orientation is not None:
        ref.PatientOrientation = orientation
    return ref


def _software_versions(source: Dataset) -> list[str]:
    values = [v.strip(" \x00") for v in dv.text_of(source, "SoftwareVersions").split("\\")]
    ok = [v for v in values if v and len(v.encode("utf-8")) <= dv.MAX_LENGTH["LO"] and v.isprintable()]
    return ok if len(ok) == len([v for v in values if v]) else []


def _read_dt(value: object) -> str | None:
    """A DT value (YYYYMMDD[HH[MM[SS[.ffffff]]]][+-ZZZZ]) whose date and time are real; else None."""
    v = str(value or "").strip(" \x00")
    m = _DT.fullmatch(v)
    if m is None or dv.read_da(m.group(1)) is None:
        return None
    if m.group(2) and dv.read_tm(m.group(2)) is None:
        return None
    if m.group(3) and not m.group(2):  # an offset with no time part: validators refuse it
        return m.group(1)
    return v


def _orientation(source: Dataset) -> list[str] | None:
    """PatientOrientation: two values of the direction letters (A, P, L, R, H, F); else None."""
    values = [v.strip(" \x00").upper() for v in dv.text_of(source, "PatientOrientation").split("\\")]
    if len(values) == 2 and all(_ORIENTATION.fullmatch(v) for v in values):
        return values
    return None
