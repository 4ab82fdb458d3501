"""Validation and eligibility of incoming datasets (pure functions)."""

from __future__ import annotations

import copy

import pytest
from dicom_factory import knee_dx
from pydicom.uid import UID, ExplicitVRLittleEndian

from agent.errors import StoreRefused
from agent.ingest import validate
from agent.ingest.eligibility import Rules, evaluate
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


def test_eligible_knee() -> None:
    assert evaluate(knee_dx(), RULES).eligible


@pytest.mark.parametrize(
    ("change", "reason_part"),
    [
        ({"Modality": "CT"}, "modality CT"),
        ({"BodyPartExamined": "CHEST"}, "body part CHEST"),
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
    from pydicom.dataset import Dataset

    ds = knee_dx(body_part="")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "72696002", "SCT", "Knee"
    ds.AnatomicRegionSequence = [item]
    assert evaluate(ds, RULES).eligible


def test_too_many_pixels_is_skipped_not_decoded() -> None:
    ds = knee_dx()
    ds.Rows, ds.Columns = 5000, 5000
    assert "exceeds the decoding limit" in (evaluate(ds, RULES).reason or "")
