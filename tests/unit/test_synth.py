"""Synthetic knee-radiograph generator: determinism, labels, manifest, DICOM validity."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from model.io import read_pixels
from model.synth.anatomy import CORTEX, TRABECULAR
from model.synth.generate import MANIFEST_COLUMNS, PRESETS, SynthRecord, generate, generate_one, patient_images
from model.synth.patient import PatientModel, sample_patient, who_class

CONTRACT_COLUMNS = [
    "path",
    "patient_id",
    "study_instance_uid",
    "sop_instance_uid",
    "laterality",
    "label",
    "severity",
    "t_score",
    "age",
    "sex",
    "bmi",
    "profile",
]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("synth_a")
    manifest = generate(out, 8, seed=5, compressed_fraction=0.5)
    with manifest.open(newline="") as fh:
        return out, list(csv.DictReader(fh))


def test_presets_present() -> None:
    assert {"default", "easy", "hard"} <= set(PRESETS)


def test_manifest_columns_and_count(dataset: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = dataset
    assert len(rows) == 8
    with (out / "manifest.csv").open() as fh:
        header = fh.readline().strip().split(",")
    assert header[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    assert list(MANIFEST_COLUMNS) == CONTRACT_COLUMNS
    for r in rows:
        assert (out / r["path"]).is_file()
        assert (out / r["mask_path"]).is_file()
        assert r["laterality"] in {"L", "R", "B"}
        assert r["label"] in {"0", "1"}
        t = float(r["t_score"])
        assert int(r["label"]) == int(t <= -1.0)
        if r["label"] == "0":
            assert r["severity"] == ""
        else:
            assert r["severity"] == str(int(t <= -2.5))
        assert r["sex"] in {"M", "F", ""}


def test_patient_level_fields_consistent(dataset: tuple[Path, list[dict[str, str]]]) -> None:
    _, rows = dataset
    by_patient: dict[str, set[tuple[str, ...]]] = {}
    for r in rows:
        key = (r["label"], r["severity"], r["t_score"], r["age"], r["sex"], r["bmi"], r["profile"])
        by_patient.setdefault(r["patient_id"], set()).add(key)
    assert all(len(v) == 1 for v in by_patient.values())
    assert any(sum(r["patient_id"] == p for r in rows) > 1 for p in by_patient)


def test_dicom_headers_and_decoding(dataset: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = dataset
    syntaxes = set()
    for r in rows:
        ds = pydicom.dcmread(out / r["path"])
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        assert ds.BodyPartExamined == "KNEE"
        assert ds.Modality in {"DX", "CR"}
        assert ds.SOPInstanceUID == r["sop_instance_uid"]
        assert ds.StudyInstanceUID == r["study_instance_uid"]
        assert ds.PatientID == r["patient_id"]
        assert ds.ViewPosition in {"AP", "PA"}
        if ds.Modality == "DX":
            assert ds.ImageLaterality == r["laterality"]
            assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.BitsStored in {12, 14, 16}
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns)
        px = read_pixels(out / r["path"])
        assert px.dtype == np.float32 and 0.0 <= px.min() and px.max() <= 1.0
    assert len(syntaxes) >= 2  # some compressed, some not


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", 3, seed=9, compressed_fraction=0.5).parent
    b = generate(tmp_path / "b", 3, seed=9, compressed_fraction=0.5).parent
    c = generate(tmp_path / "c", 3, seed=10, compressed_fraction=0.5).parent
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_generate_one_in_memory() -> None:
    img, patient = generate_one(np.random.default_rng(3), "default", laterality="R")
    assert img.stored.dtype == np.uint16 and img.stored.ndim == 2
    assert img.image.shape == img.stored.shape == img.mask.shape
    assert img.image.dtype == np.float32
    assert (img.mask == CORTEX).any() and (img.mask == TRABECULAR).any()
    assert patient.label == int(patient.t_score <= -1.0)


def test_patient_images_is_deterministic(one_record: SynthRecord) -> None:
    p2, recs2 = patient_images(8, 0)
    assert np.array_equal(one_record.image.stored, recs2[0].image.stored)
    assert one_record.header == recs2[0].header


def test_class_mix_within_tolerance() -> None:
    model = PatientModel()
    who = [sample_patient(np.random.default_rng([21, i]), i, model).who for i in range(300)]
    mix = np.bincount(who, minlength=3) / len(who)
    assert np.allclose(mix, [0.4, 0.2, 0.4], atol=0.08), mix


def test_who_thresholds() -> None:
    assert who_class(-0.99) == 0 and who_class(-1.0) == 1
    assert who_class(-2.49) == 1 and who_class(-2.5) == 2


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, 1, seed=0, preset="nope")
    with pytest.raises(ValueError):
        generate(tmp_path, 1, seed=0, compressed_fraction=1.5)


def test_selfcheck_auroc_helper() -> None:
    from model.synth.selfcheck import auroc

    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5


@pytest.fixture(scope="module")
def one_record() -> SynthRecord:
    return patient_images(8, 0)[1][0]


@pytest.mark.parametrize("codec", [None, "j2k", "jls", "rle"])
def test_each_codec_is_lossless_and_keeps_uids(tmp_path: Path, codec: str | None, one_record: SynthRecord) -> None:
    from model.synth.acquisition import VENDOR_PROFILES
    from model.synth.dicom_writer import build_dataset, write

    rec = one_record
    ds = build_dataset(rec.image.stored, rec.header, VENDOR_PROFILES[rec.image.profile])
    path = tmp_path / "x.dcm"
    tsyntax = write(ds, path, codec, rec.image.stored)
    back = pydicom.dcmread(path)
    assert str(back.file_meta.TransferSyntaxUID) == tsyntax
    assert back.SOPInstanceUID == rec.header.sop_uid == back.file_meta.MediaStorageSOPInstanceUID
    assert np.array_equal(back.pixel_array, rec.image.stored)
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"  # original untouched


@pytest.mark.parametrize(("preset", "laterality"), [("easy", "L"), ("hard", "B")])
def test_presets_and_bilateral_films(preset: str, laterality: str) -> None:
    img, _ = generate_one(np.random.default_rng(2), preset, laterality=laterality, profile="northwind_cr")
    p = PRESETS[preset]
    assert img.stored.shape == (p.rows, p.bilateral_cols if laterality == "B" else p.cols)
    assert img.laterality == laterality and img.profile == "northwind_cr"
    assert img.stored.max() <= (1 << 12) - 1


def test_profile_holdout_preset() -> None:
    from model.synth.presets import with_profiles

    held = with_profiles(PRESETS["default"], ("acme_dx",))
    patient, records = patient_images(3, 1, held)
    assert {r.image.profile for r in records} == {"acme_dx"}
    with pytest.raises(ValueError):
        with_profiles(PRESETS["default"], ("nope",))
