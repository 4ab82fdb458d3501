"""Seeded synthetic knee-radiograph data sets: DICOM files, masks and a manifest CSV.

Public API
----------
``generate(out_dir, n, seed, preset="default", compressed_fraction=0.25, repeat_fraction=None) -> Path``
    Writes ``n`` images (retakes included) and returns ``out_dir/manifest.csv``.
``generate_one(rng, preset="default", ...) -> (SynthImage, Patient)``
    One image in memory (no disk), for tests and benchmarks.
``patient_images(seed, index, preset) -> (Patient, list[SynthRecord])``
    All images of one patient in memory, exactly as ``generate`` would write them.
``patient_knees(seed, index, preset) -> (Patient, {side: Knee})``
    A patient and both knees without rendering (the ceiling of a written set).
``PRESETS``
    Preset name -> :class:`~model.synth.presets.Preset`.

Every patient draws from its own generator ``default_rng([seed, index])``, so a patient's
images do not depend on the others and the same seed always gives byte-identical files.
Retakes (``repeat_fraction``) draw from generators of their own, so turning them on adds files
and leaves every other film's pixels and header as they were.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.synth.acquisition import VENDOR_PROFILES, VendorProfile
from model.synth.dicom_writer import COMPRESSIONS, ImageHeader, build_dataset, make_uid, write
from model.synth.patient import Patient, sample_patient
from model.synth.presets import PRESETS, Preset, get_preset
from model.synth.scene import Knee, SynthImage, make_knees, render_image

__all__ = [
    "MANIFEST_COLUMNS",
    "PRESETS",
    "Preset",
    "SynthRecord",
    "generate",
    "generate_one",
    "patient_images",
    "patient_knees",
]

MANIFEST_COLUMNS = (
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
)
EXTRA_COLUMNS = ("mask_path", "view_position", "transfer_syntax", "oa_grade", "rows", "columns")
_BASE_DATE = dt.date(2023, 1, 2)


@dataclass
class SynthRecord:
    """One image of a patient with its header."""

    image: SynthImage
    header: ImageHeader
    study_index: int
    retake_of: str | None = None  # a retake: the SOP Instance UID of the film it repeats


def generate_one(
    rng: np.random.Generator,
    preset: str | Preset = "default",
    *,
    patient: Patient | None = None,
    laterality: str | None = None,
    view: str = "AP",
    profile: str | None = None,
    index: int = 0,
) -> tuple[SynthImage, Patient]:
    """Generate one image in memory; the patient is drawn from ``rng`` unless given."""
    p = get_preset(preset)
    if patient is None:
        patient = sample_patient(rng, index, p.patient)
    knees = make_knees(patient, p, rng)
    lat = laterality or str(rng.choice(["L", "R"]))
    prof = profile or str(rng.choice(list(p.profiles)))
    return render_image(rng, patient, knees, p, lat, view, prof), patient


def _study_plan(rng: np.random.Generator, p: Preset) -> list[list[str]]:
    """Films per study: [["L", "R"]], [["B"]], [["R"], ["L", "R"]] ..."""
    n_studies = 2 if rng.random() < p.two_study_fraction else 1
    plan = []
    for _ in range(n_studies):
        if rng.random() < p.bilateral_fraction:
            plan.append(["B"])
        elif rng.random() < p.single_side_fraction:
            plan.append([str(rng.choice(["L", "R"]))])
        else:
            plan.append(["R", "L"])
    return plan


_REPEAT_KEY = 0x4E7A4E  # the retakes' own generators: default_rng([seed, index, _REPEAT_KEY, study, film])
_OTHER_VIEW = {"AP": "PA", "PA": "AP"}


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], not {value!r}")


def retake_plan(
    seed: int, index: int, study: int, film: int, laterality: str, view: str, preset: Preset
) -> tuple[np.random.Generator, str] | None:
    """Whether film ``film`` of study ``study`` of patient ``index`` is retaken: None, or the
    retake's generator (drawn up to its render) and view. Only L and R films are retaken; the
    film's own generator decides, nothing else is drawn from it before."""
    if preset.repeat_fraction <= 0.0 or laterality not in ("L", "R"):
        return None
    rep = np.random.default_rng([seed, index, _REPEAT_KEY, study, film])
    if rep.random() >= preset.repeat_fraction:
        return None
    return rep, _OTHER_VIEW[view] if rep.random() < preset.repeat_other_view else view


def _patient_and_knees(rng: np.random.Generator, seed: int, index: int, p: Preset) -> tuple[Patient, dict[str, Knee]]:
    """The patient and both knees, the first draws from the patient's generator ``rng``."""
    patient = sample_patient(rng, index, p.patient)
    # the seed is part of the identity: sets made with different seeds never share a patient ID
    patient = dataclasses.replace(patient, patient_id=f"SYN{seed}-{index:06d}")
    return patient, make_knees(patient, p, rng)


def patient_knees(seed: int, index: int, preset: str | Preset = "default") -> tuple[Patient, dict[str, Knee]]:
    """Patient ``index`` of ``seed`` and both knees, as :func:`patient_images` draws them, without
    rendering a film (for the Bayes ceiling of a written set, ``model.synth.ceiling``)."""
    return _patient_and_knees(np.random.default_rng([seed, index]), seed, index, get_preset(preset))


def patient_images(seed: int, index: int, preset: str | Preset = "default") -> tuple[Patient, list[SynthRecord]]:
    """All images of patient ``index`` for ``seed``, exactly as :func:`generate` writes them.

    With ``preset.repeat_fraction`` > 0 a single-knee film (L or R) is retaken in the same study
    with that probability: the same knee (same bone and anatomy), a fresh acquisition (pose,
    exposure, noise, markers), in the film's view or, with ``preset.repeat_other_view``, the
    other one. Everything about a retake (whether, its view, its pixels) comes from the film's own
    generator ``default_rng([seed, index, 0x4E7A4E, study, film])``, never from the patient's,
    so the other films are the same whatever the fraction, and a film retaken at one fraction is
    retaken, with the same pixels, at every larger one. A retake follows its film in the list,
    with its own SOP Instance UID, the next instance number of the study and a series of its own
    (a second acquisition; a knee is its study and side, whatever the series)."""
    p = get_preset(preset)
    _check_fraction("repeat_fraction", p.repeat_fraction)
    _check_fraction("repeat_other_view", p.repeat_other_view)
    rng = np.random.default_rng([seed, index])
    patient, knees = _patient_and_knees(rng, seed, index, p)
    profile = str(rng.choice(list(p.profiles)))  # one site per patient: hold-out by vendor works
    first = _BASE_DATE + dt.timedelta(days=int(seed % 97) + int(rng.integers(0, 700)))
    birth = first - dt.timedelta(days=int(patient.age * 365.25 + rng.integers(0, 365)))
    records: list[SynthRecord] = []
    for s, films in enumerate(_study_plan(rng, p)):
        day = first + dt.timedelta(days=int(s * rng.integers(60, 400)))
        when = dt.datetime.combine(day, dt.time(int(rng.integers(7, 19)), int(rng.integers(0, 60))))
        age = patient.age + (day - first).days // 365
        study_uid = make_uid(seed, "study", index, s)
        series_uid = make_uid(seed, "series", index, s)
        view = "PA" if rng.random() < p.pa_fraction else "AP"
        study = ImageHeader(
            patient_id=patient.patient_id,
            patient_name=f"SYNTHETIC^PATIENT{index:06d}",
            birth_date=birth,
            sex=patient.sex_recorded,
            age=age,
            height_m=patient.height_m,
            weight_kg=patient.weight_kg if patient.bmi_recorded is not None else None,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid="",
            study_datetime=when,
            accession=f"A{seed % 1000:03d}{index:06d}{s}",
            study_id=f"{s + 1}",
            series_number=1,
            instance_number=0,
            laterality="",
            view=view,
            kvp=0.0,
            magnification=1.0,
            burned_in_text=False,
        )
        retakes = 0
        for k, lat in enumerate(films):
            img = render_image(rng, patient, knees, p, lat, view, profile)
            hdr = _film_header(study, make_uid(seed, "sop", index, s, k), k + 1, img)
            records.append(SynthRecord(img, hdr, s))
            retake = retake_plan(seed, index, s, k, lat, view, p)
            if retake is None:
                continue
            rep, r_view = retake
            r_img = render_image(rep, patient, knees, p, lat, r_view, profile)
            r_k = len(films) + retakes  # after every first film of the study: new UID and number
            retakes += 1
            r_hdr = _film_header(
                study,
                make_uid(seed, "sop", index, s, r_k),
                r_k + 1,
                r_img,
                series=(make_uid(seed, "series", index, s, "retake", r_k), 1 + retakes),
            )
            records.append(SynthRecord(r_img, r_hdr, s, retake_of=hdr.sop_uid))
    return patient, records


def _film_header(
    study: ImageHeader,
    sop_uid: str,
    instance_number: int,
    img: SynthImage,
    series: tuple[str, int] | None = None,
) -> ImageHeader:
    """One film's header: the study's values with the film's own; ``series`` (UID, number) for a
    film in a series of its own."""
    series_uid, series_number = series or (study.series_uid, study.series_number)
    return dataclasses.replace(
        study,
        series_uid=series_uid,
        series_number=series_number,
        sop_uid=sop_uid,
        instance_number=instance_number,
        laterality=img.laterality,
        view=img.view,
        kvp=img.kvp,
        magnification=img.magnification,
        burned_in_text=img.burned_in_text,
    )


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def generate(
    out_dir: Path,
    n: int,
    seed: int,
    preset: str = "default",
    compressed_fraction: float = 0.25,
    repeat_fraction: float | None = None,
) -> Path:
    """Write ``n`` synthetic DICOM images (plus label-mask PNGs), ``manifest.csv`` and
    ``dataset.json`` (the generator's parameters and counts).

    Files go to ``out_dir/images/<patient_id>/`` and ``out_dir/masks/<patient_id>/``; the
    manifest paths are relative to ``out_dir``. Masks are 8-bit PNGs aligned with the DICOM
    pixels: 0 background, 1 cortex, 2 trabecular region (``model.synth.anatomy``).
    A ``compressed_fraction`` of the files is stored JPEG 2000 lossless, JPEG-LS lossless or
    RLE lossless (chosen per image from the seed).
    ``repeat_fraction`` (None: the preset's, 0 in every named preset) of the single-knee films
    get a retake in the same study (:func:`patient_images`), written beside the film as
    ``<stem>_retake.dcm``; with 0 the files are the same as before retakes existed.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    _check_fraction("compressed_fraction", compressed_fraction)
    p = get_preset(preset)
    if repeat_fraction is not None:
        _check_fraction("repeat_fraction", repeat_fraction)
        p = dataclasses.replace(p, repeat_fraction=float(repeat_fraction))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codec_rng = np.random.default_rng([seed, 0xC0DEC])
    codecs = sorted(COMPRESSIONS)
    rows: list[dict[str, str]] = []
    index = retakes = 0
    while len(rows) < n:
        patient, records = patient_images(seed, index, p)
        index += 1
        for rec in records:
            if len(rows) >= n:
                break
            hdr, img = rec.header, rec.image
            stem = f"{patient.patient_id}_s{rec.study_index + 1}_{hdr.laterality}"
            if rec.retake_of is not None:
                stem += "_retake"
                retakes += 1
            rel = Path("images") / patient.patient_id / f"{stem}.dcm"
            rel_mask = Path("masks") / patient.patient_id / f"{stem}.png"
            codec = None
            if codec_rng.random() < compressed_fraction:
                codec = str(codec_rng.choice(codecs))
            ds = build_dataset(img.stored, hdr, _profile(img.profile))
            tsyntax = write(ds, out_dir / rel, codec, img.stored)
            (out_dir / rel_mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.mask).save(out_dir / rel_mask, compress_level=1)
            rows.append(
                {
                    "path": rel.as_posix(),
                    "patient_id": patient.patient_id,
                    "study_instance_uid": hdr.study_uid,
                    "sop_instance_uid": hdr.sop_uid,
                    "laterality": hdr.laterality,
                    "label": str(patient.label),
                    "severity": "" if patient.severity is None else str(patient.severity),
                    "t_score": f"{patient.t_score:.2f}",
                    "age": str(patient.age),  # DXA-time age: constant per patient
                    "sex": patient.sex_recorded,
                    "bmi": _fmt(patient.bmi_recorded),
                    "profile": img.profile,
                    "mask_path": rel_mask.as_posix(),
                    "view_position": hdr.view,
                    "transfer_syntax": tsyntax,
                    "oa_grade": str(patient.oa_grade),
                    "rows": str(img.stored.shape[0]),
                    "columns": str(img.stored.shape[1]),
                }
            )
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*MANIFEST_COLUMNS, *EXTRA_COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    card = {
        "generator": "model.synth.generate",
        "n": n,
        "seed": seed,
        "preset": preset if isinstance(preset, str) else "custom",
        "compressed_fraction": compressed_fraction,
        "repeat_fraction": p.repeat_fraction,
        "n_patients": index,
        "n_retakes": retakes,
        "preset_parameters": p.to_dict(),
    }
    (out_dir / "dataset.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return manifest


def _profile(name: str) -> VendorProfile:
    return VENDOR_PROFILES[name]


def main(argv: list[str] | None = None) -> None:
    """``python -m model.synth.generate OUT_DIR --n 100 --seed 0 [--preset default]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Write a synthetic knee-radiograph data set.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--compressed-fraction", type=float, default=0.25)
    ap.add_argument("--repeat-fraction", type=float, default=0.0)
    args = ap.parse_args(argv)
    print(generate(args.out_dir, args.n, args.seed, args.preset, args.compressed_fraction, args.repeat_fraction))


if __name__ == "__main__":
    main()
