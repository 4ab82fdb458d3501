"""Preprocessing from decoded pixels to the network input: the ONE path for training and serving.

``preprocess(read_pixels(...), spec)``: square crop (centre crop of a fraction of the short side,
or the whole image padded to a square), exact area (box) resampling to ``input_size`` (an
integer block mean first, then an area-weight matrix product: no aliasing of the trabecular
texture, ~2 to 4 ms), optional CLAHE, then a robust per-image percentile normalisation so that
global brightness (vendor processing, exposure) carries as little information as possible.
The spec travels inside the checkpoint metadata (``to_dict`` / ``from_dict``).

Why a centre crop: knee films are taken with the joint centred in the collimated field; a fixed
centre crop of 85 % of the short side keeps the distal femur, the joint and the proximal tibia
while cutting most collimator edges, markers and text, and it behaves the same on any real film.
Laterality flips and other augmentations belong to the trainer, not here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from os import PathLike
from typing import Any

import numpy as np

from model.io import read_pixels

__all__ = ["PreprocessSpec", "crop_box", "crop_resize", "preprocess", "preprocess_file", "resize_mask"]

_CROPS = ("center", "full")
_NORMS = ("percentile", "none")


@dataclass(frozen=True)
class PreprocessSpec:
    """How decoded pixels become the network input.

    Attributes
    ----------
    input_size
        Output side S; the result has shape (1, S, S).
    crop
        ``"center"``: centre square of ``crop_fraction`` x the short side.
        ``"full"``: the whole image, padded to a square with its median value.
    crop_fraction
        Side of the centre crop relative to the short side, in (0, 1].
    normalize
        ``"percentile"``: map [p_low, p_high] percentiles to [0, 1] (clipped), then standardise
        with fixed ``(x - 0.5) / 0.25``; ``"none"``: the resampled [0, 1] values, standardised.
    p_low, p_high
        Percentiles for ``"percentile"`` normalisation.
    clahe
        Apply CLAHE (scikit-image) after resampling; ``clahe_clip`` is its clip limit.
    """

    input_size: int = 256
    crop: str = "center"
    crop_fraction: float = 0.85
    normalize: str = "percentile"
    p_low: float = 0.5
    p_high: float = 99.5
    clahe: bool = False
    clahe_clip: float = 0.01
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, int) or not 8 <= self.input_size <= 4096:
            raise ValueError(f"input_size must be an int in [8, 4096], got {self.input_size!r}")
        if self.crop not in _CROPS:
            raise ValueError(f"crop must be one of {_CROPS}, got {self.crop!r}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must lie in (0, 1], got {self.crop_fraction!r}")
        if self.normalize not in _NORMS:
            raise ValueError(f"normalize must be one of {_NORMS}, got {self.normalize!r}")
        if not 0.0 <= self.p_low < self.p_high <= 100.0:
            raise ValueError("need 0 <= p_low < p_high <= 100")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``, missing take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PreprocessSpec keys: {sorted(unknown)}")
        return cls(**data)


def _validate(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("image is empty")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    return arr


def crop_box(shape: tuple[int, ...], spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """The square the network sees, in the image's own pixel coordinates: (row0, col0, row1,
    col1), ends exclusive. For ``"full"`` the square reaches past the short side's edges (the
    padding). The agent reports it as the assessed region and places the saliency map on it."""
    h, w = int(shape[0]), int(shape[1])
    if spec.crop == "center":
        side = max(1, int(round(spec.crop_fraction * min(h, w))))
        r0, c0 = (h - side) // 2, (w - side) // 2
    else:
        side = max(h, w)
        r0, c0 = -((side - h) // 2), -((side - w) // 2)
    return r0, c0, r0 + side, c0 + side


def _square(arr: np.ndarray, spec: PreprocessSpec, pad_value: float | None = None) -> np.ndarray:
    """The square of ``crop_box``; for ``"full"`` the padding is ``pad_value`` (None: the image's
    median, the training path's choice for pixels; a mask pads with 0, outside it)."""
    h, w = arr.shape
    r0, c0, r1, c1 = crop_box(arr.shape, spec)
    if spec.crop == "center":
        return arr[r0:r1, c0:c1]
    if h == w:
        return arr
    pad = np.median(arr) if pad_value is None else pad_value
    out = np.full((r1 - r0, c1 - c0), pad, dtype=np.float32)
    out[-r0 : -r0 + h, -c0 : -c0 + w] = arr
    return out


@lru_cache(maxsize=64)
def _area_plan(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Integer part and fraction of the output pixel edges in input coordinates."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    idx = np.minimum(np.floor(edges).astype(np.intp), n_in - 1)
    frac = (edges - idx).astype(np.float32)
    return idx, frac, np.float32(n_out / n_in)


def _area_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Exact area (box) resampling along one axis through the integral of the signal.

    The cumulative sum evaluated at the output pixel edges (linear inside an input pixel, which
    is exact for a piecewise-constant signal) gives each output pixel's integral. No BLAS: the
    cost is O(N) and free of thread contention on a shared CPU.
    """
    n_in = x.shape[axis]
    idx, frac, inv = _area_plan(n_in, n_out)
    xm = np.moveaxis(x, axis, -1)
    c = np.zeros(xm.shape[:-1] + (n_in + 1,), dtype=np.float64)
    np.cumsum(xm, axis=-1, out=c[..., 1:])
    at = c[..., idx] + frac * xm[..., idx]
    out = (np.diff(at, axis=-1) * inv).astype(np.float32)
    return np.moveaxis(out, -1, axis)


def _block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """k x k block mean by strided sums (much faster than reshape().mean on a crop view)."""
    h, w = arr.shape
    arr = arr[: (h // k) * k, : (w // k) * k]
    rows = arr[0::k].copy()
    for i in range(1, k):
        rows += arr[i::k]
    out = rows[:, 0::k].copy()
    for j in range(1, k):
        out += rows[:, j::k]
    out *= np.float32(1.0 / (k * k))
    return out


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Area resampling of a square-ish array to (size, size): block mean, then matrices."""
    h, w = arr.shape
    k = min(h, w) // size
    if k >= 2:
        arr = _block_mean(arr, k)
        h, w = arr.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(arr, dtype=np.float32)
    return np.ascontiguousarray(_area_axis(_area_axis(arr, size, 0), size, 1))


def crop_resize(pixels: np.ndarray, spec: PreprocessSpec, pad_value: float | None = None) -> np.ndarray:
    """Geometric part only: crop and resample to (S, S) float32, values unchanged in scale.
    ``pad_value``: what fills the padding of crop ``"full"`` (None: the image's median)."""
    arr = _validate(pixels)
    return _resize(_square(arr, spec, pad_value), spec.input_size).astype(np.float32, copy=False)


def resize_mask(mask: np.ndarray, spec: PreprocessSpec, label: int | None = None) -> np.ndarray:
    """A label mask in network-input geometry: the fraction of each output pixel that has
    ``label`` (or is non-zero when ``label`` is None), float32 (S, S) in [0, 1]."""
    m = np.asarray(mask)
    binary = (m != 0) if label is None else (m == label)
    return crop_resize(binary.astype(np.float32), spec, pad_value=0.0)  # the padding has no label


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded [0, 1] pixels to a float32 (1, S, S) network input (deterministic)."""
    x = crop_resize(pixels, spec)
    if spec.normalize == "percentile":
        lo, hi = np.percentile(x, [spec.p_low, spec.p_high])
        # A (near-)constant image must not have its rounding noise stretched to full range.
        flat = hi - lo <= 1e-5 * max(1.0, abs(lo), abs(hi))
        x = np.zeros_like(x) if flat else (x - lo) / (hi - lo)
        np.clip(x, 0.0, 1.0, out=x)
    if spec.clahe:
        from skimage.exposure import equalize_adapthist

        x = equalize_adapthist(np.clip(x, 0.0, 1.0), clip_limit=spec.clahe_clip).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.25)
    return np.ascontiguousarray(x[None, :, :], dtype=np.float32)


def preprocess_file(path: str | PathLike[str], spec: PreprocessSpec, max_pixels: int | None = None) -> np.ndarray:
    """``read_pixels`` then ``preprocess``: the single path used by training and serving."""
    return preprocess(read_pixels(path, max_pixels=max_pixels), spec)
