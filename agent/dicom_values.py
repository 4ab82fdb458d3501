"""Reading and printing DICOM attribute values the same way everywhere: a patient's age and a DA date."""

from __future__ import annotations

import re
from datetime import date

from pydicom.dataset import Dataset

_AGE = re.compile(r"(\d{3})([DWMY])")
_PER_YEAR = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}


def parse_da(value: str) -> date | None:
    """A DA value (YYYYMMDD) as a date; None when empty or not a valid date."""
    v = str(value or "")
    if len(v) != 8 or not v.isdigit():
        return None
    try:
        return date(int(v[:4]), int(v[4:6]), int(v[6:]))
    except ValueError:
        return None


def format_da(value: str | None) -> str:
    """A DA value as YYYY-MM-DD for people; anything that is not eight digits is shown as it is."""
    v = value or ""
    return f"{v[:4]}-{v[4:6]}-{v[6:]}" if len(v) == 8 and v.isdigit() else v


def patient_age_years(ds: Dataset) -> float | None:
    """Age at the study in years: PatientAge (nnnD/W/M/Y) when present, else StudyDate minus
    PatientBirthDate; None when neither gives one."""
    m = _AGE.fullmatch(str(ds.get("PatientAge", "") or ""))
    if m:
        return int(m.group(1)) / _PER_YEAR[m.group(2)]
    birth = parse_da(str(ds.get("PatientBirthDate", "") or ""))
    when = parse_da(str(ds.get("StudyDate", "") or ""))
    if birth is None or when is None:
        return None
    return (when - birth).days / 365.25
