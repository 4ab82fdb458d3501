"""Precomputed trabecular texture tiles.

Two periodic, zero-mean, unit-variance Gaussian random fields (one with vertical, one with
horizontal trabecular orientation) are made once per process from a fixed seed by oriented
band-pass filtering of white noise in the Fourier domain. Images sample them through an
affine index map (offset, zoom, rotation), which is far cheaper than filtering per image and
still gives every image its own texture. Thresholding a field at quantile ``q`` gives a network
whose area fraction is ``1 - Phi(q)``: this is how bone volume fraction is set.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

TILE = 512  # periodic tile side, px (power of two: cheap FFT and modulo by mask)
PERIOD_PX = 12.0  # nominal trabecular period at zoom 1, px of the generated image
_TILE_SEED = 20260427


@lru_cache(maxsize=1)
def texture_tiles() -> np.ndarray:
    """Return float32 (TILE, TILE, 2): channel 0 vertical, channel 1 horizontal trabeculae."""
    rng = np.random.default_rng(_TILE_SEED)
    f = np.fft.fftfreq(TILE)
    fv, fu = np.meshgrid(f, f, indexing="ij")  # fv: along rows (vertical), fu: along columns
    f0 = 1.0 / PERIOD_PX
    out = np.empty((TILE, TILE, 2), dtype=np.float32)
    for ch, (along, across) in enumerate(((fv, fu), (fu, fv))):
        # Vertical trabeculae vary fast across (u) and slowly along (v); some orientation spread.
        radial = np.exp(-0.5 * ((np.abs(across) - f0) / (0.35 * f0)) ** 2)
        elong = np.exp(-0.5 * (along / (0.30 * f0)) ** 2)
        spectrum = np.fft.fft2(rng.standard_normal((TILE, TILE)))
        field = np.real(np.fft.ifft2(spectrum * radial * elong))
        field = (field - field.mean()) / field.std()
        out[..., ch] = field.astype(np.float32)
    return out


def sample_tiles(u: np.ndarray, v: np.ndarray, zoom: float, offset: tuple[int, int]) -> np.ndarray:
    """Sample both fields at anatomical coordinates (``u`` columns, ``v`` rows, in px).

    Nearest-neighbour lookup is adequate because the fields are band-limited well below Nyquist
    for the zoom range used (0.7 to 1.4).
    """
    flat = texture_tiles().reshape(TILE * TILE, 2)
    z = np.float32(zoom)
    iu = (u * z).astype(np.int32)
    iu += offset[1]
    iu &= TILE - 1
    iv = (v * z).astype(np.int32)
    iv += offset[0]
    iv &= TILE - 1
    iv <<= TILE.bit_length() - 1
    iv += iu
    return np.take(flat, iv, axis=0)


def threshold_for_fraction(fraction: float) -> float:
    """Quantile of a standard normal field above which ``fraction`` of the area lies."""
    from statistics import NormalDist

    fraction = float(np.clip(fraction, 1e-3, 0.999))
    return NormalDist().inv_cdf(1.0 - fraction)
