"""X-ray acquisition and vendor processing.

Beer-Lambert projection of the path-length maps with kVp-dependent attenuation, heel effect,
scatter that rises with BMI (soft-tissue thickness), spatially correlated photon and electronic
noise, collimation and lead markers; then a vendor processing chain (log, auto-window from the
histogram, gamma, unsharp mask, bit depth, optional MONOCHROME1) so that raw brightness says
little about bone density.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class VendorProfile:
    """Detector and processing characteristics of one (fictional) vendor/site."""

    name: str
    manufacturer: str
    model: str
    modality: str  # "DX" or "CR"
    photometric: str  # "MONOCHROME2" or "MONOCHROME1"
    bits_stored: int
    pixel_spacing_mm: float
    gamma: float
    unsharp_amount: float
    unsharp_radius: int  # px, box-blur radius of the unsharp mask
    electronic_noise: float  # SD in photon-count units
    window_lo_pct: float  # vendor auto-window percentiles of the exposed field
    window_hi_pct: float
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0


_PROFILE_LIST = (
    VendorProfile(
        name="acme_dx", manufacturer="Acme Imaging", model="AcmeDR 4343", modality="DX",
        photometric="MONOCHROME2", bits_stored=12, pixel_spacing_mm=0.148, gamma=0.9,
        unsharp_amount=0.6, unsharp_radius=24, electronic_noise=3.0,
        window_lo_pct=0.5, window_hi_pct=99.7,
    ),
    VendorProfile(
        name="helix_dx", manufacturer="Helix Medical", model="HX-Flat 2", modality="DX",
        photometric="MONOCHROME2", bits_stored=14, pixel_spacing_mm=0.139, gamma=1.15,
        unsharp_amount=1.1, unsharp_radius=16, electronic_noise=2.0,
        window_lo_pct=1.0, window_hi_pct=99.5,
    ),
    VendorProfile(
        name="northwind_cr", manufacturer="Northwind Radiography", model="NW CR-5", modality="CR",
        photometric="MONOCHROME1", bits_stored=12, pixel_spacing_mm=0.1, gamma=1.0,
        unsharp_amount=0.35, unsharp_radius=32, electronic_noise=5.0,
        window_lo_pct=0.2, window_hi_pct=99.9, rescale_slope=2.0, rescale_intercept=-50.0,
    ),
    VendorProfile(
        name="orion_dx", manufacturer="Orion Systems", model="OrionView 17", modality="DX",
        photometric="MONOCHROME2", bits_stored=16, pixel_spacing_mm=0.143, gamma=0.8,
        unsharp_amount=0.8, unsharp_radius=20, electronic_noise=2.5,
        window_lo_pct=2.0, window_hi_pct=99.0,
    ),
    VendorProfile(
        name="kestrel_dx", manufacturer="Kestrel Diagnostics", model="K-Ray 3", modality="DX",
        photometric="MONOCHROME1", bits_stored=14, pixel_spacing_mm=0.15, gamma=1.05,
        unsharp_amount=0.5, unsharp_radius=28, electronic_noise=3.5,
        window_lo_pct=0.8, window_hi_pct=99.8,
    ),
)  # fmt: skip
VENDOR_PROFILES: dict[str, VendorProfile] = {p.name: p for p in _PROFILE_LIST}


@dataclass(frozen=True)
class Exposure:
    """Per-image acquisition settings."""

    kvp: float
    photons: float  # mean unattenuated counts per pixel
    heel: float  # fractional intensity gradient across the field
    heel_axis: int  # 0 rows, 1 columns
    scatter_fraction: float  # scatter-to-primary ratio at the leg centre


def attenuation(
    soft: np.ndarray, cortical: np.ndarray, trabecular: np.ndarray, metal: np.ndarray, kvp: float
) -> np.ndarray:
    """Line integral of attenuation; bone contrast falls faster with kVp than soft tissue."""
    e = kvp / 70.0
    mu_soft = np.float32(0.0052 * e**-0.45)
    mu_bone = np.float32(0.0085 * e**-1.6)  # excess over soft tissue, per px of path
    bone = cortical + trabecular
    bone *= mu_bone
    out = soft * mu_soft
    out += bone
    out += metal
    return out


def box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Separable box blur of radius ``r`` via cumulative sums (O(N), edge-replicated)."""
    if r < 1:
        return img
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float32)
        n = out.shape[axis]
        if axis == 0:
            out = c[2 * r + 1 : 2 * r + 1 + n] - c[:n]
        else:
            out = c[:, 2 * r + 1 : 2 * r + 1 + n] - c[:, :n]
        out /= 2 * r + 1
    return out


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of unit-variance noise with a little spatial correlation (detector and
    focal-spot blur act on the quantum noise); images take random crops and flips of it."""
    n = np.random.default_rng(777).standard_normal((2048, 2048), dtype=np.float32)
    w = np.float32(0.22)
    n[1:-1] = (1 - 2 * w) * n[1:-1] + w * (n[:-2] + n[2:])
    n[:, 1:-1] = (1 - 2 * w) * n[:, 1:-1] + w * (n[:, :-2] + n[:, 2:])
    n /= n.std()
    return n


def _noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    bank = _noise_bank()
    h, w = shape
    r = int(rng.integers(0, bank.shape[0] - h + 1))
    c = int(rng.integers(0, bank.shape[1] - w + 1))
    view = bank[r : r + h, c : c + w]
    flips = int(rng.integers(0, 4))
    return view[:: (-1 if flips & 1 else 1), :: (-1 if flips & 2 else 1)]


def expose(
    mu: np.ndarray,
    exposure: Exposure,
    profile: VendorProfile,
    collimation: tuple[int, int, int, int] | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Detected counts (float32) from the attenuation line integral (``mu`` is consumed)."""
    h, w = mu.shape
    primary = np.exp(np.negative(mu, out=mu), out=mu)
    axis_len = h if exposure.heel_axis == 0 else w
    ramp = np.linspace(1.0 - exposure.heel, 1.0 + exposure.heel, axis_len, dtype=np.float32)
    ramp *= np.float32(exposure.photons)
    primary *= ramp[:, None] if exposure.heel_axis == 0 else ramp[None, :]
    if collimation is not None:
        # Lead shutters pass only a few per cent (their edge is sharp).
        r0, r1, c0, c1 = collimation
        k = np.float32(0.03)
        primary[:r0] *= k
        primary[r1:] *= k
        primary[r0:r1, :c0] *= k
        primary[r0:r1, c1:] *= k
    # Scatter: a very low-pass copy of the primary, scaled with the body's thickness.
    small = primary[::8, ::8]
    sc = box_blur(box_blur(small, 12), 12) * np.float32(exposure.scatter_fraction)
    sc = np.repeat(np.repeat(sc, 8, axis=0), 8, axis=1)[:h, :w]
    counts = primary
    counts += sc
    sd = np.sqrt(counts + np.float32(profile.electronic_noise**2))
    sd *= _noise((h, w), rng)
    counts += sd
    return np.maximum(counts, np.float32(0.5), out=counts)


def process(counts: np.ndarray, profile: VendorProfile, exposed: np.ndarray) -> np.ndarray:
    """Vendor chain: log, histogram auto-window, gamma, unsharp mask. Returns [0, 1] float32,
    MONOCHROME2 sense (bright = attenuating). ``counts`` is consumed."""
    sig = np.log(counts, out=counts)
    sig *= np.float32(-1.0)
    sub = sig[::4, ::4][exposed[::4, ::4]]
    if sub.size < 16:
        sub = sig[::4, ::4].ravel()
    lo, hi = np.percentile(sub, [profile.window_lo_pct, profile.window_hi_pct])
    x = sig
    x -= np.float32(lo)
    x *= np.float32(1.0 / max(hi - lo, 1e-6))
    np.clip(x, 0.0, 1.0, out=x)
    if profile.gamma != 1.0:
        # Gamma through a 4096-entry table: much cheaper than a float power.
        lut = np.linspace(0.0, 1.0, 4096, dtype=np.float32) ** np.float32(profile.gamma)
        x = lut[(x * np.float32(4095.0) + np.float32(0.5)).astype(np.int32)]
    if profile.unsharp_amount > 0:
        small = x[::2, ::2]
        lp = box_blur(box_blur(small, profile.unsharp_radius // 2), profile.unsharp_radius // 2)
        lp = np.repeat(np.repeat(lp, 2, axis=0), 2, axis=1)[: x.shape[0], : x.shape[1]]
        amount = np.float32(profile.unsharp_amount)
        x *= np.float32(1.0) + amount
        lp *= amount
        x -= lp
    return np.clip(x, 0.0, 1.0, out=x)


@lru_cache(maxsize=16)
def glyph(text: str, size: int) -> np.ndarray:
    """Binary bitmap of ``text`` rendered with Pillow's default font (cached)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (int(right - left) + 4, int(bottom - top) + 4), 0)
    ImageDraw.Draw(img).text((2 - left, 2 - top), text, fill=255, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def stamp(img: np.ndarray, bitmap: np.ndarray, r: int, c: int, value: float, add: bool) -> None:
    """Place ``bitmap`` at (r, c), clipped to the image; add or overwrite-by-max."""
    h, w = img.shape
    bh, bw = bitmap.shape
    r0, c0 = max(r, 0), max(c, 0)
    r1, c1 = min(r + bh, h), min(c + bw, w)
    if r0 >= r1 or c0 >= c1:
        return
    patch = bitmap[r0 - r : r1 - r, c0 - c : c1 - c] * np.float32(value)
    if add:
        img[r0:r1, c0:c1] += patch
    else:
        np.maximum(img[r0:r1, c0:c1], patch, out=img[r0:r1, c0:c1])
