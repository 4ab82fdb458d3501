"""Load one spooled instance for screening: size caps first, then the model's decoding path.

Anything that cannot be screened raises InputRejected with a reason a person can act on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from agent.dicom_values import patient_age_years
from agent.errors import InputRejected
from model.io import read_pixels


@dataclass(frozen=True)
class LoadedImage:
    """The instance's header (full dataset) and its decoded pixels in [0, 1]."""

    dataset: Dataset
    pixels: np.ndarray
    clinical: dict[str, Any]
    decode_ms: float


def clinical_variables(ds: Dataset) -> dict[str, Any]:
    """Age, sex and BMI from the header; None where absent (the model handles missingness)."""
    sex = str(ds.get("PatientSex", "") or "").upper()
    bmi = None
    try:
        weight, height = float(ds.get("PatientWeight") or 0), float(ds.get("PatientSize") or 0)
        if weight > 0 and 0.5 < height < 2.6:
            bmi = weight / (height * height)
    except (TypeError, ValueError):
        bmi = None
    return {"age": patient_age_years(ds), "sex": sex if sex in ("M", "F") else None, "bmi": bmi}


def load(path: Path, max_pixels: int) -> LoadedImage:
    t0 = time.perf_counter()
    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt file raises many types; the job gets the reason
        raise InputRejected(f"cannot read the stored instance ({exc.__class__.__name__})") from None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols > max_pixels or frames > 1 and rows * cols * frames > max_pixels * 4:
        raise InputRejected(f"image of {rows}x{cols}x{frames} pixels exceeds the decoding limit")
    try:
        pixels = read_pixels(ds, max_pixels=max_pixels)
    except ValueError as exc:
        raise InputRejected(f"pixel data cannot be decoded: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - codec plugins raise their own types on corrupt streams
        raise InputRejected(f"pixel data cannot be decoded ({exc.__class__.__name__})") from None
    return LoadedImage(ds, pixels, clinical_variables(ds), (time.perf_counter() - t0) * 1000)
