"""agent/dicom_values.py: each reader, on the values hospitals send (docs/dicom-values.md), and
agent/errors.py's reason_of, the one rule by which an exception becomes a shown reason."""

from __future__ import annotations

import warnings
from datetime import date

import pydicom
import pytest
from dicom_factory import as_received, knee_dx, set_raw
from pydicom.dataset import Dataset

from agent import dicom_values as dv
from agent.errors import BuildError, InputRejected, ProcessingError, reason_of, redact

# the tests plant invalid values on purpose: pydicom says so each time
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("19450325", "19450325"),
        (" 19450325 ", "19450325"),
        ("1945-03-25", "19450325"),
        ("1945/03/25", "19450325"),
        ("1945.03.25", "19450325"),
        (date(1945, 3, 25), "19450325"),
        ("25/03/1945", None),  # day-first: ambiguous across sites
        ("11.02.2023", None),
        ("03/25/1945", None),
        ("00000000", None),
        ("20230230", None),
        ("1945-3-25", None),
        ("1945-03/25", None),
        ("=1+1", None),
        ("", None),
        (None, None),
        ("19450325-19460101", None),  # a range is a query, not a date
    ],
)
def test_read_da(value: object, expected: str | None) -> None:
    assert dv.read_da(value) == expected
    assert dv.parse_da(value) == (None if expected is None else date(1945, 3, 25))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("101500", "101500"),
        ("1015", "1015"),
        ("10", "10"),
        ("101500.123456", "101500.123456"),
        ("10:15", "1015"),
        ("10:15:00", "101500"),
        ("10:15:00.5", "101500.5"),
        ("12:30 PM", None),
        ("251500", None),
        ("106000", None),
        ("1015.5", None),  # a fraction needs seconds
        ("", None),
        (None, None),
    ],
)
def test_read_tm(value: object, expected: str | None) -> None:
    assert dv.read_tm(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("045Y", "045Y"), ("006M", "006M"), ("010W", "010W"), ("003D", "003D"), (" 045y ", "045Y"),
     ("000Y", None), ("8", None), ("45 Y", None), ("0045Y", None), ("", None), (None, None)],
)  # fmt: skip
def test_read_as(value: object, expected: str | None) -> None:
    assert dv.read_as(value) == expected


def _aged(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("values", "years"),
    [
        ({"PatientAge": "045Y"}, 45.0),
        ({"PatientAge": "006M"}, 0.5),
        ({"PatientAge": "045Y", "PatientBirthDate": "20000101", "StudyDate": "20260101"}, 45.0),  # AS wins
        # 000Y and a unit-less age are unknown: the dates say
        ({"PatientAge": "000Y", "PatientBirthDate": "19450325", "StudyDate": "20230211"}, 77.9),
        ({"PatientAge": "8", "PatientBirthDate": "1945-03-25", "StudyDate": "20230211"}, 77.9),
        ({"PatientAge": "000Y"}, None),
        ({"PatientBirthDate": "25/03/1945", "StudyDate": "20230211"}, None),
        ({"PatientBirthDate": "19450325", "StudyDate": "=1+1"}, None),
        ({"PatientBirthDate": "20300101", "StudyDate": "20230211"}, None),  # born after the study
        ({"PatientBirthDate": "19000101", "StudyDate": "20260101"}, None),  # a placeholder: 126 years
        ({}, None),
    ],
)
def test_patient_age_years(values: dict[str, str], years: float | None) -> None:
    got = dv.patient_age_years(_aged(**values))
    assert got == (None if years is None else pytest.approx(years, abs=0.05))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("M", "M"), ("F", "F"), ("O", "O"), ("male", "M"), (" Male ", "M"), ("m", "M"), ("female", "F"),
     ("f", "F"), ("FEMALE", "F"), ("other", "O"), ("U", ""), ("unknown", ""), ("X", ""), ("", ""), (None, "")],
)  # fmt: skip
def test_read_sex(value: object, expected: str) -> None:
    assert dv.read_sex(value) == expected


@pytest.mark.parametrize(
    ("image", "series", "expected"),
    [
        ("L", "L", ("L", False)),
        ("r", None, ("R", False)),
        (" R ", "r", ("R", False)),
        (None, "left", ("L", False)),
        ("B", None, ("B", False)),
        ("U", "L", ("L", False)),
        ("U", None, (None, False)),
        ("L", "R", (None, True)),
        (None, None, (None, False)),
    ],
)
def test_read_laterality(image: str | None, series: str | None, expected: tuple[str | None, bool]) -> None:
    ds = Dataset()
    if image is not None:
        ds.ImageLaterality = image
    if series is not None:
        ds.Laterality = series
    assert dv.read_laterality(ds) == expected


def test_read_cs() -> None:
    ds = _aged(BodyPartExamined="knee ", ViewPosition="ap", Modality="D-X")
    assert dv.read_cs(ds, "BodyPartExamined") == "KNEE"
    assert dv.read_cs(ds, "ViewPosition") == "AP"
    assert dv.read_cs(ds, "Modality") is None  # not a code string
    assert dv.read_cs(ds, "StationName") is None  # absent
    ds.BodyPartExamined = "A" * 17
    assert dv.read_cs(ds, "BodyPartExamined") is None


def test_read_string_never_cuts_an_id() -> None:
    ds = Dataset()
    ds.PatientID = " PID-1 "
    assert dv.read_string(ds, "PatientID", "LO") == "PID-1"
    set_raw(ds, "AccessionNumber", "A" * 17)  # SH holds 16
    assert dv.read_string(ds, "AccessionNumber", "SH") is None
    set_raw(ds, "StudyID", "1\\2")
    assert dv.read_string(ds, "StudyID", "SH") is None
    set_raw(ds, "PatientID", "P\t1")
    assert dv.read_string(ds, "PatientID", "LO") is None
    assert dv.read_string(ds, "IssuerOfPatientID", "LO") is None


def test_read_pn() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    assert dv.read_pn(ds, "PatientName") == "Doe^Jane"
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert dv.read_pn(ds, "PatientName") == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    set_raw(ds, "PatientName", "A^B^C^D^E^F")  # six components
    assert dv.read_pn(ds, "PatientName") is None
    set_raw(ds, "PatientName", "A" * 65)
    assert dv.read_pn(ds, "PatientName") is None
    set_raw(ds, "PatientName", "a=b=c=d")
    assert dv.read_pn(ds, "PatientName") is None
    del ds.PatientName
    assert dv.read_pn(ds, "PatientName") is None


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("ISO_IR 6", "Doe^Jane"),
        ("ISO-8859-1", "Müller^Jürgen"),
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Müller^Jürgen"),
    ],
)
def test_text_is_decoded_under_the_source_character_set(charset: object, name: str) -> None:
    """pydicom decodes ISO 2022 escapes and reads misspelt character sets (with a warning):
    its decoded text is what the agent uses."""
    ds = knee_dx()
    set_raw(ds, "SpecificCharacterSet", charset)
    ds.PatientName = name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's word on a misspelt character set
        received = as_received(ds)
        assert dv.read_pn(received, "PatientName") == name


def test_a_value_pydicom_cannot_convert_is_read_as_absent_not_raised() -> None:
    ds = as_received(knee_dx(), InstanceNumber="abc", PatientAge="8")
    assert dv.read_positive_int(dv.value_of(ds, "InstanceNumber")) is None
    assert dv.read_positive_int(3) == 3 and dv.read_positive_int("-2") is None
    assert dv.read_as(dv.value_of(ds, "PatientAge")) is None


def test_read_uid() -> None:
    assert dv.read_uid("1.2.840.10008.1.1") == "1.2.840.10008.1.1"
    assert dv.read_uid("1.2.03") is None and dv.read_uid("1." + "2" * 63) is None and dv.read_uid("") is None


# ---- reasons ----------------------------------------------------------------------------------


def test_reason_of_names_a_library_error_by_its_class_only() -> None:
    """A library's message may hold the value it failed on, quoted or not: none of it is kept."""
    assert reason_of(ValueError("Unable to convert '25/03/1945' to 'DA' object")) == "ValueError"
    assert reason_of(ValueError("invalid date 25/03/1945")) == "ValueError"
    assert reason_of(AttributeError("Zyxwvut^Qwertyuiop (PID-98765-PHI): no AccessionNumber")) == "AttributeError"
    assert reason_of(KeyError("PatientID")) == "KeyError"


def test_reason_of_keeps_the_agents_own_wording() -> None:
    assert reason_of(InputRejected("blank or nearly uniform image")) == "blank or nearly uniform image"
    assert reason_of(ProcessingError("the SR helper process died")) == "the SR helper process died"
    built = BuildError("overlay could not be built: ValueError")
    assert isinstance(built, ValueError) and reason_of(built) == str(built)
    assert len(reason_of(InputRejected("x" * 5000))) <= 400
    assert "1.2.840.113619" not in reason_of(InputRejected("study 1.2.840.113619.2.55.3 has no series"))


def test_logging_redacts_library_warnings_by_the_same_rule() -> None:
    from agent.logging import redact_warning

    text = "Invalid value for VR PN: 'O'BRIEN^PAT' at (0010,0010)"
    assert redact_warning(text) == redact(text) == "Invalid value for VR PN: [value]"


def test_pydicom_reads_what_the_factory_writes() -> None:
    ds = as_received(knee_dx(), PatientBirthDate="25/03/1945")
    assert isinstance(ds, pydicom.Dataset) and str(ds.PatientBirthDate) == "25/03/1945"
    assert dv.read_da(ds.PatientBirthDate) is None


def test_undeclared_utf8_is_read_as_utf8_and_latin1_stays() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    from agent.dicom_values import read_pn

    def with_raw_name(raw: bytes, charset: str | None) -> Dataset:
        ds = Dataset()
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds[0x00100010] = RawDataElement(Tag(0x00100010), "PN", len(raw), raw, 0, False, True)
        return ds

    assert read_pn(with_raw_name("Ωμέγα^Zoë".encode(), None), "PatientName") == "Ωμέγα^Zoë"
    assert read_pn(with_raw_name("Ωμέγα^Zoë".encode(), "ISO_IR 6"), "PatientName") == "Ωμέγα^Zoë"
    assert read_pn(with_raw_name("Müller^Jörg".encode("latin-1"), None), "PatientName") == "Müller^Jörg"
    # declared Latin-1 is Latin-1, whatever the bytes would make as UTF-8
    assert read_pn(with_raw_name("ZoÃ«".encode("latin-1"), "ISO_IR 100"), "PatientName") == "ZoÃ«"


def test_a_logged_traceback_keeps_its_frames_but_not_the_message() -> None:
    """``log.exception`` printed the exception's message as the traceback's last line; a library's
    message may hold the value it failed on (int('CANARY') for a NumberOfFrames of CANARY)."""
    import subprocess
    import sys

    probe = (
        "import logging\n"
        "from agent.logging import configure_logging, get_logger\n"
        "configure_logging('info', 'json')\n"
        "try:\n    int('CANARY-25/03/1945')\nexcept ValueError:\n    get_logger('probe').exception('boom')\n"
        "try:\n    raise KeyError('ZZPHI^NAME')\nexcept KeyError:\n    logging.getLogger('lib').exception('lib boom')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stderr
    assert "boom" in out and "lib boom" in out and "Traceback" in out
    assert "ValueError" in out and "KeyError" in out
    assert "CANARY" not in out.replace("int('CANARY-25/03/1945')", "")  # the source line is code, not data
    assert "ZZPHI" not in out.replace("raise KeyError('ZZPHI^NAME')", "")


def test_placeholder_years_leap_seconds_and_date_only_offsets_are_not_copied() -> None:
    """Each of these made dciodvfy report errors in the SR and the overlay."""
    from agent.reporting.source import _read_dt

    assert dv.read_da("19450325") == "19450325" and dv.read_da("18000101") == "18000101"
    assert dv.read_da("00010101") is None and dv.read_da("0001-01-01") is None
    assert dv.read_da("99991231") is None and dv.read_da("30000101") is None
    assert dv.read_tm("235959") == "235959" and dv.read_tm("235960") is None
    assert _read_dt("20230211+0100") == "20230211" and _read_dt("20230211120000+0100") == "20230211120000+0100"
