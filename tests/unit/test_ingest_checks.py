"""Validation and eligibility of incoming datasets (pure functions)."""

from __future__ import annotations

import copy

import pytest
from dicom_factory import as_received, knee_dx
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from agent.errors import StoreRefused
from agent.ingest import validate
from agent.ingest.eligibility import (
    BODY_PART_REASON,
    GENERIC_BODY_PART_REASON,
    LATERAL_REASON,
    MODALITY_REASON,
    OBLIQUE_REASON,
    Rules,
    evaluate,
)
from agent.pacs import status

RULES = Rules(
    modalities=frozenset({"DX", "CR"}),
    body_parts=frozenset({"KNEE"}),
    anatomic_region_codes=frozenset({"72696002"}),
    min_age_years=18,
    max_pixels=10_000_000,
)


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.1.1", True),
        ("2.25.123", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("../../etc/passwd", False),
        ("1.2.3/../4", False),
        ("1.2.3;rm -rf", False),
        ("1..2", False),
        ("", False),
        (".1.2", False),
    ],
)
def test_uid_syntax(uid: str, ok: bool) -> None:
    assert validate.valid_uid(uid) is ok


def test_identifiers_must_agree() -> None:
    ds = knee_dx()
    validate.check_identifiers(ds, ds.SOPClassUID, ds.SOPInstanceUID)
    with pytest.raises(StoreRefused) as err:
        validate.check_identifiers(ds, ds.SOPClassUID, "1.2.3.4")
    assert err.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    with pytest.raises(StoreRefused) as err:
        validate.check_identifiers(ds, "1.2.840.10008.5.1.4.1.1.2", ds.SOPInstanceUID)
    assert err.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_invalid_study_uid_cannot_be_understood() -> None:
    ds = knee_dx()
    ds.StudyInstanceUID = "1.2.3/../../x"
    with pytest.raises(StoreRefused) as err:
        validate.check_identifiers(ds, ds.SOPClassUID, ds.SOPInstanceUID)
    assert err.value.status == status.CANNOT_UNDERSTAND


def test_truncated_pixel_data_is_refused() -> None:
    ds = knee_dx(rows=128, cols=128)
    validate.check_pixel_data(ds, UID(ExplicitVRLittleEndian))
    short = copy.deepcopy(ds)
    short.PixelData = ds.PixelData[:1000]
    with pytest.raises(StoreRefused) as err:
        validate.check_pixel_data(short, UID(ExplicitVRLittleEndian))
    assert err.value.status == status.CANNOT_UNDERSTAND


def test_pixel_bomb_attributes_are_refused() -> None:
    ds = knee_dx(rows=64, cols=64)
    ds.Rows, ds.Columns = 60000, 60000  # lies: the data is 8 KB
    with pytest.raises(StoreRefused):
        validate.check_pixel_data(ds, UID(ExplicitVRLittleEndian))
    ds = knee_dx(rows=64, cols=64)
    ds.NumberOfFrames = 999999
    with pytest.raises(StoreRefused):
        validate.check_pixel_data(ds, UID(ExplicitVRLittleEndian))


def test_missing_pixel_data_does_not_match_sop_class() -> None:
    ds = knee_dx()
    del ds.PixelData
    with pytest.raises(StoreRefused) as err:
        validate.check_pixel_data(ds, UID(ExplicitVRLittleEndian))
    assert err.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_malformed_encapsulated_pixel_data_cannot_be_understood() -> None:
    """Conformance statement 2.4: malformed encapsulated pixel data is 0xC210, as are fewer
    fragments than frames; a well-formed fragment stream passes (decoding is the worker's)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = knee_dx(rows=64, cols=64)
    ds.PixelData = encapsulate([b"\xff\x4f" + b"x" * 100])
    validate.check_pixel_data(ds, UID(JPEG2000Lossless))
    item = b"\xfe\xff\x00\xe0"  # (FFFE,E000)
    for pixel in (
        b"\x01\x02\x03\x04" + b"y" * 50,  # not an item tag
        item + b"\x00\x00\x00\x00" + item + b"\xff\xff\xff\xff",  # a fragment of undefined length
        item + b"\x00\x00\x00\x00" + item + b"\x10",  # a fragment without its length
        item + b"\x00\x00\x00\x00" + item + b"\x00\x01\x00\x00" + b"z" * 100,  # 256 bytes declared, 100 there
    ):
        bad = copy.deepcopy(ds)
        bad.PixelData = pixel
        with pytest.raises(StoreRefused, match="encapsulated pixel data is malformed") as err:
            validate.check_pixel_data(bad, UID(JPEG2000Lossless))
        assert err.value.status == status.CANNOT_UNDERSTAND
    table_only = copy.deepcopy(ds)
    table_only.PixelData = item + b"\x00\x00\x00\x00"  # a Basic Offset Table and no fragment
    with pytest.raises(StoreRefused, match="fewer pixel data fragments than frames"):
        validate.check_pixel_data(table_only, UID(JPEG2000Lossless))
    frames = copy.deepcopy(ds)
    frames.NumberOfFrames = 3
    with pytest.raises(StoreRefused, match="fewer pixel data fragments than frames") as err:
        validate.check_pixel_data(frames, UID(JPEG2000Lossless))
    assert err.value.status == status.CANNOT_UNDERSTAND


def test_eligible_knee() -> None:
    assert evaluate(knee_dx(), RULES).eligible


@pytest.mark.parametrize(
    ("change", "reason_part"),
    [
        ({"Modality": "CT"}, MODALITY_REASON),
        ({"BodyPartExamined": "CHEST"}, BODY_PART_REASON),
        ({"PatientBirthDate": "20200101"}, "younger than 18"),
        ({"PatientAge": "012Y"}, "younger than 18"),
    ],
)
def test_ineligible_reasons(change: dict[str, str], reason_part: str) -> None:
    ds = knee_dx()
    for k, v in change.items():
        setattr(ds, k, v)
    result = evaluate(ds, RULES)
    assert not result.eligible
    assert reason_part in (result.reason or "")


def test_knee_by_anatomic_region_code() -> None:
    ds = knee_dx(body_part="")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "72696002", "SCT", "Knee"
    ds.AnatomicRegionSequence = [item]
    assert evaluate(ds, RULES).eligible


def test_too_many_pixels_is_skipped_not_decoded() -> None:
    ds = knee_dx()
    ds.Rows, ds.Columns = 5000, 5000
    assert "exceeds the decoding limit" in (evaluate(ds, RULES).reason or "")


# ---- views, body parts and ages as hospitals send them (docs/dicom-values.md) ---------------------------


def _coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        ("LL", LATERAL_REASON), ("RL", LATERAL_REASON), ("LAT", LATERAL_REASON), ("lateral", LATERAL_REASON),
        (" ll ", LATERAL_REASON), ("LLO", OBLIQUE_REASON), ("rlo", OBLIQUE_REASON), ("OBLIQUE", OBLIQUE_REASON),
        ("AP", None), ("pa", None), ("", None), ("RLD", None),
    ],
)  # fmt: skip
def test_lateral_and_oblique_views_are_skipped(view: str, reason: str | None) -> None:
    result = evaluate(as_received(knee_dx(), ViewPosition=view), RULES)
    assert (result.eligible, result.reason) == (reason is None, reason)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (("399067008", "SCT", "lateral"), LATERAL_REASON),
        (("R-10236", "SRT", "left lateral"), LATERAL_REASON),
        (("399099002", "SCT", "latero-medial oblique"), OBLIQUE_REASON),
        (("R-10242", "SRT", "medio-lateral oblique"), OBLIQUE_REASON),
        (("399348003", "SCT", "antero-posterior"), None),
        (("272479007", "SCT", "postero-anterior"), None),
    ],
)
def test_a_view_code_of_a_lateral_or_oblique_view_is_skipped(code: tuple[str, str, str], reason: str | None) -> None:
    ds = knee_dx()
    del ds.ViewPosition
    ds.ViewCodeSequence = [_coded(*code)]
    result = evaluate(as_received(ds), RULES)
    assert (result.eligible, result.reason) == (reason is None, reason)


@pytest.mark.parametrize(
    ("body_part", "descriptions", "eligible"),
    [
        ("knee ", {}, True),
        (" Knee", {}, True),
        ("EXTREMITY", {"StudyDescription": "XR KNEE 2 VIEWS"}, True),
        ("LEG", {"SeriesDescription": "Knie links a.p."}, True),
        ("", {"ProtocolName": "GENOU_FACE"}, True),
        (None, {"StudyDescription": "Rodilla derecha"}, True),
        ("EXTREMITY", {"ProtocolName": "Ginocchio^AP"}, True),
        ("LEG", {"StudyDescription": "RX JOELHO"}, True),
        ("EXTREMITY", {}, False),
        ("LEG", {"StudyDescription": "XR ANKLE"}, False),
        ("", {"StudyDescription": "kneecap"}, False),  # a word, not a part of one
        (None, {}, False),
        ("CHEST", {"StudyDescription": "knee"}, False),  # a specific body part is believed
    ],
)
def test_body_part_variants(body_part: str | None, descriptions: dict[str, str], eligible: bool) -> None:
    ds = as_received(knee_dx(), BodyPartExamined=body_part, **descriptions)
    result = evaluate(ds, RULES)
    assert result.eligible is eligible, result.reason
    if not eligible:
        assert result.reason in (GENERIC_BODY_PART_REASON, BODY_PART_REASON)
        assert result.reason == (BODY_PART_REASON if body_part == "CHEST" else GENERIC_BODY_PART_REASON)


def test_a_generic_body_part_with_a_knee_code_is_screened() -> None:
    ds = knee_dx(body_part="EXTREMITY")
    ds.AnatomicRegionSequence = [_coded("72696002", "SCT", "Knee")]
    assert evaluate(as_received(ds), RULES).eligible


@pytest.mark.parametrize(
    ("values", "eligible"),
    [
        ({"PatientAge": "000Y", "PatientBirthDate": "20200101"}, False),  # 000Y is unknown: the dates say
        ({"PatientAge": "000Y", "PatientBirthDate": "19450325"}, True),
        ({"PatientAge": "8", "PatientBirthDate": ""}, True),  # unit-less: unknown age is screened
        ({"PatientAge": "012Y"}, False),  # paediatric: min_age_years
        ({"PatientAge": "", "PatientBirthDate": "25/03/1945"}, True),  # unreadable: unknown
        ({"PatientAge": "", "PatientBirthDate": "2020-01-01"}, False),  # year-first dates are read
    ],
)
def test_age_decisions(values: dict[str, str], eligible: bool) -> None:
    result = evaluate(as_received(knee_dx(), **values), RULES)
    assert result.eligible is eligible, result.reason


def test_reasons_name_no_value() -> None:
    ds = as_received(knee_dx(), Modality="Zyxwvut", BodyPartExamined="Qwertyuiop")
    assert "Zyxwvut" not in (evaluate(ds, RULES).reason or "")
    ds = as_received(knee_dx(), BodyPartExamined="QWERTY")
    assert "QWERTY" not in (evaluate(ds, RULES).reason or "")


def test_a_number_of_frames_that_is_not_a_number_is_refused_as_not_understood() -> None:
    """int('CANARY') escaped as a ValueError and was answered 0xA700, which a PACS retries for ever."""
    for bad in ("CANARY", "0", "-3"):
        ds = as_received(knee_dx(), NumberOfFrames=bad)
        with pytest.raises(StoreRefused) as refused:
            validate.check_pixel_data(ds, UID(ExplicitVRLittleEndian))
        assert refused.value.status == status.CANNOT_UNDERSTAND and bad not in str(refused.value)
