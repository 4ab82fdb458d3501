"""Load one spooled instance for screening: size caps first, then the model's decoding path, then
a look at what was decoded (a blank film is not screened).

Anything that cannot be screened raises InputRejected with a reason a person can act on; no
reason names an element value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from agent.dicom_values import patient_age_years, read_positive_int, read_sex, value_of
from agent.errors import InputRejected, reason_of
from model.io import read_pixels

#: A decoded film whose middle 98 % of values (1st to 99th percentile) spans less than this part
#: of the grey range, or that shows fewer than ``BLANK_MIN_LEVELS`` grey values, is blank: an
#: unexposed or burnt-out plate, a uniform test image. Measured (docs/dicom-values.md): the films
#: of tests/dicom_factory.py span 0.64 to 0.66 with 228 (8 bits stored) to 35,000 grey values, the
#: model's generated radiographs 0.99 to 1.00 with 4,000 to 15,400; a uniform film 0 with one
#: value; one with +-2 of noise 0.001 with 5 values (spread 1.0 without a window: the min-max
#: fallback stretches the noise, hence the count of values too).
BLANK_MAX_SPREAD = 0.02
BLANK_MIN_LEVELS = 16
BLANK_REASON = "blank or nearly uniform image"
_BLANK_SAMPLE = 65_536  # pixels looked at (a regular grid): ~3 ms on a 5 M pixel film


@dataclass(frozen=True)
class LoadedImage:
    """The instance's header (full dataset) and its decoded pixels in [0, 1]."""

    dataset: Dataset
    pixels: np.ndarray
    clinical: dict[str, Any]
    decode_ms: float


def clinical_variables(ds: Dataset) -> dict[str, Any]:
    """Age, sex and BMI from the header; None where absent (the model handles missingness)."""
    sex = read_sex(value_of(ds, "PatientSex"))
    bmi = None
    try:
        weight, height = float(value_of(ds, "PatientWeight") or 0), float(value_of(ds, "PatientSize") or 0)
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
    frames = read_positive_int(value_of(ds, "NumberOfFrames")) or 1
    if rows * cols > max_pixels or frames > 1 and rows * cols * frames > max_pixels * 4:
        raise InputRejected(f"image of {rows}x{cols}x{frames} pixels exceeds the decoding limit")
    try:
        pixels = read_pixels(ds, max_pixels=max_pixels)
    except ValueError as exc:
        raise InputRejected(f"pixel data cannot be decoded: {reason_of(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - codec plugins raise their own types on corrupt streams
        raise InputRejected(f"pixel data cannot be decoded ({exc.__class__.__name__})") from None
    if is_blank(pixels):
        raise InputRejected(BLANK_REASON)
    return LoadedImage(ds, pixels, clinical_variables(ds), (time.perf_counter() - t0) * 1000)


def spread(pixels: np.ndarray) -> tuple[float, int]:
    """(1st-to-99th percentile range, number of distinct values) of a decoded film, on a regular
    grid of about ``_BLANK_SAMPLE`` of its pixels."""
    step = max(1, int(np.sqrt(pixels.size / _BLANK_SAMPLE)))
    sample = np.ascontiguousarray(pixels[::step, ::step]).ravel()
    lo, hi = np.percentile(sample, [1.0, 99.0])
    return float(hi - lo), int(np.unique(sample).size)


def is_blank(pixels: np.ndarray) -> bool:
    """True for a blank or nearly uniform film (``BLANK_MAX_SPREAD``, ``BLANK_MIN_LEVELS``)."""
    if pixels.ndim != 2 or pixels.size == 0:
        return False  # not this check's to judge: the screening path refuses it
    width, levels = spread(pixels)
    return width < BLANK_MAX_SPREAD or levels < BLANK_MIN_LEVELS
