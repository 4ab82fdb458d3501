"""Reading DICOM attribute values as hospitals send them, the same way everywhere.

Every patient or study value the agent uses (eligibility, the clinical variables, the rows it
records, the results it sends back) is read here, leniently: a value in a common near-DICOM form
is normalised (``1945-03-25`` -> ``19450325``, ``12:30`` -> ``1230``, ``male`` -> ``M``), and
anything else is treated as absent, never passed on and never an error. The decision per attribute
is in docs/dicom-values.md.

Nothing here raises on a value, and nothing here logs: a value read here is PHI.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: PatientAge as DICOM writes it (AS): three digits and a unit
_AGE = re.compile(r"(\d{3})([DWMY])")
_PER_YEAR = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}
#: an age beyond this (a placeholder birth date such as 19000101) is treated as unknown
MAX_AGE_YEARS = 120.0

_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
#: the years a date of a patient or a study can fall in; others are placeholders
YEARS = (1800, 2200)
_DA_YEAR_FIRST = re.compile(r"(\d{4})([-/.])(\d{2})\2(\d{2})")  # 1945-03-25, 1945/03/25, 1945.03.25
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?")
_TM_COLONS = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")

_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R", "B": "B", "BOTH": "B", "BILATERAL": "B"}

#: longest value of each text VR (PS3.5 6.2), counted in bytes of its UTF-8 encoding: the results
#: are written in UTF-8 and validators count bytes
MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240}
_CS = re.compile(r"[A-Z0-9 _]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 controls (C1: mis-declared bytes)
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # ST/LT may hold TAB, LF, FF, CR
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}  # \ = ^


# ---- dates, times, ages -----------------------------------------------------------------------


def read_da(value: Any) -> str | None:
    """A date as DICOM DA (YYYYMMDD), or None.

    Accepted: YYYYMMDD; year-first YYYY-MM-DD, YYYY/MM/DD, YYYY.MM.DD (normalised). A day-first or
    month-first date (25/03/1945, 11.02.2023) is ambiguous across sites and is not read, nor is
    anything that is not a real calendar date (00000000, 20230230)."""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    v = _plain(value)
    m = _DA.fullmatch(v)
    if m:
        y, mo, d = m.group(1), m.group(2), m.group(3)
    else:
        m = _DA_YEAR_FIRST.fullmatch(v)
        if m is None:
            return None
        y, mo, d = m.group(1), m.group(3), m.group(4)
    try:
        date(int(y), int(mo), int(d))
    except ValueError:
        return None
    if not YEARS[0] <= int(y) <= YEARS[1]:  # 00010101, 99991231: placeholders (and dciodvfy refuses them)
        return None
    return f"{y}{mo}{d}"


def parse_da(value: Any) -> date | None:
    """A date (any form ``read_da`` accepts) as a ``date``; None when absent or not a date."""
    v = read_da(value)
    return None if v is None else date(int(v[:4]), int(v[4:6]), int(v[6:]))


def format_da(value: str | None) -> str:
    """A DA value as YYYY-MM-DD for people; anything that is not eight digits is shown as it is."""
    v = value or ""
    return f"{v[:4]}-{v[4:6]}-{v[6:]}" if len(v) == 8 and v.isdigit() else v


def read_tm(value: Any) -> str | None:
    """A time as DICOM TM (HH, HHMM, HHMMSS or HHMMSS.ffffff), or None.

    HH:MM, HH:MM:SS[.ffffff] are normalised (the colons dropped). A 12-hour time (12:30 PM) or
    anything out of range (a leap second 60 too: validators refuse it) is not read."""
    v = _plain(value)
    m = _TM.fullmatch(v) or _TM_COLONS.fullmatch(v)
    if m is None:
        return None
    hh, mm, ss, frac = m.group(1), m.group(2), m.group(3), m.group(4)
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 59):
        return None
    return hh + (mm or "") + (ss or "") + (frac or "")


def read_as(value: Any) -> str | None:
    """PatientAge as DICOM AS (nnnD, nnnW, nnnM or nnnY), or None: an age of zero (000Y, a
    common placeholder) and a number without its unit ("8") are unknown."""
    v = _plain(value).upper()
    m = _AGE.fullmatch(v)
    if m is None or int(m.group(1)) == 0:
        return None
    return v


def patient_age_years(ds: Dataset) -> float | None:
    """Age at the study in years: PatientAge when ``read_as`` reads it, else StudyDate minus
    PatientBirthDate (as ``read_da`` reads them); None when neither gives an age from 0 to
    ``MAX_AGE_YEARS`` (unknown)."""
    age = read_as(value_of(ds, "PatientAge"))
    if age is not None:
        years = int(age[:3]) / _PER_YEAR[age[3]]
    else:
        birth, when = parse_da(value_of(ds, "PatientBirthDate")), parse_da(value_of(ds, "StudyDate"))
        if birth is None or when is None:
            return None
        years = (when - birth).days / 365.25
    return years if 0.0 <= years <= MAX_AGE_YEARS else None


# ---- coded values -----------------------------------------------------------------------------


def read_sex(value: Any) -> str:
    """PatientSex as DICOM CS: M, F or O; male/m -> M, female/f -> F (any case, trimmed);
    U, unknown or anything else -> "" (empty: unknown)."""
    return _SEX.get(_plain(value).upper(), "")


def _side(value: Any) -> str | None:
    return _LATERALITY.get(_plain(value).upper())


def read_laterality(ds: Dataset) -> tuple[str | None, bool]:
    """(laterality, conflict): L, R or B from ImageLaterality, else Laterality (trimmed, any case;
    LEFT/RIGHT/BOTH read too); None when neither says (U, empty, absent, anything else). When both
    say and disagree: (None, True): the caller leaves laterality out and logs that it did."""
    image, series = _side(value_of(ds, "ImageLaterality")), _side(value_of(ds, "Laterality"))
    if image is not None and series is not None and image != series:
        return None, True
    return image or series, False


def read_cs(ds: Dataset, keyword: str) -> str | None:
    """A single code string (Modality, BodyPartExamined, ViewPosition ...), trimmed and
    upper-cased; None when absent, empty or not a valid CS of at most 16 characters."""
    v = _plain(text_of(ds, keyword)).upper()
    return v if v and len(v) <= MAX_LENGTH["CS"] and _CS.fullmatch(v) else None


def read_positive_int(value: Any) -> int | None:
    """An IS/US value (InstanceNumber ...) as a positive int, or None."""
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        return None
    return n if 0 < n < 2**31 else None


def read_uid(value: Any) -> str | None:
    """A UID (digits and dots, at most 64 characters), or None."""
    v = _plain(value)
    return v if v and len(v) <= 64 and _UID.fullmatch(v) else None


# ---- text ------------------------------------------------------------------------------------


def text_of(ds: Dataset, keyword: str) -> str:
    """An attribute's value as text, decoded by pydicom under the dataset's SpecificCharacterSet
    (ISO 2022 escapes and misspelt character sets included, as pydicom reads them); several values
    joined by a backslash, as DICOM writes them; "" when absent or empty."""
    value = value_of(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):  # a value too long for its VR can arrive as UN
        return _decode(bytes(value), ds)
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value)
    return _utf8_undeclared(text, ds)


def _utf8_undeclared(text: str, ds: Dataset) -> str:
    """Text that a sender wrote in UTF-8 without declaring it (no SpecificCharacterSet, or the
    default ISO_IR 6): pydicom then reads each byte as one Latin-1 character ("ZoÃ«"). Read as
    UTF-8 when the bytes are valid UTF-8; a real Latin-1 name ("Müller") is not, and stays."""
    if not any("\x80" <= c <= "\xff" for c in text):
        return text
    declared = value_of(ds, "SpecificCharacterSet")
    if declared and str(declared).strip().upper() not in ("ISO_IR 6", "ISO 2022 IR 6"):
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def read_string(ds: Dataset, keyword: str, vr: str) -> str | None:
    """A single LO, SH, ST or LT value (IDs, descriptions, names of things), trimmed; None when
    absent, empty, or not valid for ``vr`` (too long, several values, control characters): such a
    value is never cut down, since a shortened ID could name another patient or study."""
    v = _plain(text_of(ds, keyword))
    if not v or len(v.encode("utf-8")) > MAX_LENGTH[vr]:
        return None
    if vr in ("ST", "LT"):
        return None if _TEXT_CONTROL.search(v) else v
    return None if "\\" in v or _CONTROL.search(v) else v


def read_pn(ds: Dataset, keyword: str) -> str | None:
    """A person name (PN) as decoded text, trimmed; None when absent, empty or not a valid PN (more
    than three component groups or five components, a group longer than 64 bytes, several values,
    control characters)."""
    v = _plain(text_of(ds, keyword))
    if not v or "\\" in v or _CONTROL.search(v):
        return None
    groups = v.split("=")
    if len(groups) > 3:
        return None
    for group in groups:
        if len(group.encode("utf-8")) > MAX_LENGTH["PN"] or group.count("^") > 4:
            return None
    return v


def words_of(ds: Dataset, keyword: str) -> str:
    """An attribute's decoded text for matching words in (descriptions, protocol names): any
    length, several values joined by spaces; "" when absent."""
    return text_of(ds, keyword).replace("\\", " ")


def value_of(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, except that a value pydicom cannot convert (an IS of "abc", a DS of
    "1,5") comes back as its raw bytes instead of raising; None when absent."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises several types converting a malformed raw value
        tag = tag_for_keyword(keyword)
        if tag is None:
            return None
        try:
            raw = ds.get_item(tag)
        except Exception:  # noqa: BLE001 - as above: absent or unreadable is absent
            return None
        return None if raw is None else raw.value


def _plain(value: Any) -> str:
    """A value's text, trimmed of spaces and NUL padding; "" for None."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    return str(value).strip(" \x00\t\r\n")


def _decode(raw: bytes, ds: Dataset) -> str:
    charset = value_of(ds, "SpecificCharacterSet") or "ISO_IR 6"
    try:
        encodings = convert_encodings(list(charset) if isinstance(charset, MultiValue | list) else [str(charset)])
        return decode_bytes(raw, encodings, _PN_DELIMITERS)
    except (LookupError, ValueError, TypeError):
        return raw.decode("latin-1", "replace")
