"""Image input: DICOM or PNG to a float32 2-D array in [0, 1], bright = dense (MONOCHROME2).

This is the one decoding path used both to train and to serve (see ``model.preprocess``).

DICOM handling, in order: size check on Rows x Columns before any pixel data is decoded; decode
of the first frame only; Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence); VOI
(the first Window Center/Width with the VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID, else a
VOI LUT Sequence, else the image's own min-max); MONOCHROME1 inversion. PNG: 8- or 16-bit
greyscale (colour is converted to luminance), divided by the type maximum.
Every failure is a ``ValueError`` whose message says what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

__all__ = ["read_pixels"]

#: marks which entries of a lookup table's input occur in the image (None: all of them)
Present = Callable[[], np.ndarray] | None

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_GREY = ("MONOCHROME1", "MONOCHROME2")


def read_pixels(source: str | PathLike[str] | Dataset, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``source`` (DICOM/PNG path or a pydicom ``Dataset``) to float32 [0, 1].

    Parameters
    ----------
    source
        Path to a DICOM Part 10 file (or raw dataset) or a PNG file, or a ``Dataset``.
    max_pixels
        Reject images with Rows x Columns above this, before decoding the pixel data.

    Raises
    ------
    ValueError
        Not an image we can read: undecodable, not greyscale 2-D, or too large.
    """
    if isinstance(source, Dataset):
        return _from_dataset(source, max_pixels)
    path = Path(source)
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ValueError(f"cannot open image file {path.name!r}: {exc.strerror}") from exc
    if head == _PNG_MAGIC:
        return _from_png(path, max_pixels)
    try:
        # Large elements stay on disk until used, so the size check costs no decoding.
        ds = pydicom.dcmread(path, defer_size="512 KB", force=False)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a readable DICOM or PNG file {path.name!r}: {exc}") from exc
    return _from_dataset(ds, max_pixels)


def _check_size(rows: int, cols: int, max_pixels: int | None) -> None:
    if rows < 1 or cols < 1:
        raise ValueError(f"image has no pixels (Rows={rows}, Columns={cols})")
    if max_pixels is not None and rows * cols > max_pixels:
        raise ValueError(f"image too large: Rows x Columns = {rows} x {cols} = {rows * cols} > {max_pixels}")


def _from_dataset(ds: Dataset, max_pixels: int | None) -> np.ndarray:
    if "PixelData" not in ds:
        raise ValueError("dataset has no Pixel Data (7FE0,0010)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError("dataset lacks valid Rows/Columns") from exc
    _check_size(rows, cols, max_pixels)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples != 1 or photometric not in _GREY:
        raise ValueError(
            f"not a greyscale image (SamplesPerPixel={samples}, PhotometricInterpretation={photometric!r})"
        )
    try:
        arr = pixel_array(ds, index=0) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None
        if arr is None:
            arr = ds.pixel_array
    except Exception as exc:
        raise ValueError(f"pixel data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[0] >= 1 and arr.shape[1:] == (rows, cols):
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got an array of shape {arr.shape}")
    if arr.dtype.kind in "ui" and arr.itemsize <= 2:
        return _via_lookup(arr, ds, photometric)
    return _finish(_transform(arr, ds, photometric))


def _transform(arr: np.ndarray, ds: Dataset, photometric: str, present: Present = None) -> np.ndarray:
    """Modality LUT, VOI and MONOCHROME1 inversion, element by element, in float64."""
    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception as exc:
        raise ValueError(f"Modality LUT cannot be applied: {exc}") from exc
    out = _voi(values, arr, ds, present)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _via_lookup(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """The same transform for 8/16-bit pixels, computed once per stored value, not per pixel.

    Every step of ``_transform`` maps each stored value on its own, except the min-max fallback,
    which needs the range of the values present; so the table covers [min, max] of the image, the
    fallback looks only at values that occur, and the result is bit for bit the per-pixel one
    (5 M pixels: one table of at most 65,536 entries and one gather instead of float64 passes).
    """
    lo, hi = int(arr.min()), int(arr.max())
    stored = np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)
    index = arr if lo == 0 and arr.dtype.kind == "u" else np.subtract(arr, lo, dtype=np.int32)

    def present() -> np.ndarray:
        return np.bincount(index.ravel(), minlength=len(stored)) > 0

    table = _finish(_transform(stored, ds, photometric, present))
    return np.ascontiguousarray(table[index])


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS."""
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _voi(values: np.ndarray, raw: np.ndarray, ds: Dataset, present: Present = None) -> np.ndarray:
    """VOI transform to [0, 1]; falls back to the data range when no usable VOI is given."""
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            centre, width = np.nan, np.nan
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if np.isfinite(centre) and np.isfinite(width) and width > 1.0:
            if func == "SIGMOID":
                return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
            if func == "LINEAR_EXACT":
                return np.clip((values - (centre - width / 2.0)) / width, 0.0, 1.0)
            return np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if "VOILUTSequence" in ds:
        try:
            lut_out = np.asarray(apply_voi(raw if "ModalityLUTSequence" in ds else values, ds), float)
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return np.clip(lut_out / float((1 << bits) - 1), 0.0, 1.0)
        except Exception as exc:
            raise ValueError(f"VOI LUT Sequence cannot be applied: {exc}") from exc
    return _minmax(values, present)


def _minmax(values: np.ndarray, present: Present = None) -> np.ndarray:
    """Scale to [0, 1] by the range of the values (of those ``present()`` marks, when given)."""
    seen = values if present is None else values[present()]
    lo, hi = float(np.min(seen)), float(np.max(seen))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("image contains non-finite values")
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def _finish(out: np.ndarray) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError("image contains non-finite values")
    return np.ascontiguousarray(out)


def _from_png(path: Path, max_pixels: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            cols, rows = img.size  # header only: no decoding yet
            _check_size(rows, cols, max_pixels)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float64)
                top = 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"PNG cannot be decoded {path.name!r}: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got an array of shape {arr.shape}")
    return _finish(np.clip(arr / top, 0.0, 1.0))
