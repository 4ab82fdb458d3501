"""Saliency placed on bone: the Grad-CAM map kept on an estimate of bone in the assessed square,
and drawn only where the network's attention favours that bone over chance.

Grad-CAM of the screening head (``model.predict``) is an (S, S) map over the square the network
saw (``model.preprocess.crop_box``), scaled by ``model.predict`` to a maximum of 1. On the
synthetic test sets it is barely more on bone than a flat map would be: 0.285 of its mass lies on
the generator's bone mask against 0.268 for a flat map over the square (docs/evaluation). What
the overlay may honestly draw is therefore the part of the network's attention that lies on
bone, at the strength it has, and only when that part is more than chance. :func:`on_bone`:

1. the film is area-averaged onto the map's grid (cells outside the film, where the square
   reaches past it, are not bone); a film far larger than the grid is read at every k-th pixel
   first (at most 2 x 2 pixels per cell), so the cost does not grow with the detector: about
   4 ms at S = 256 on one CPU core. A film with NaN or infinite values there is refused
   (ValueError);
2. collimation is cut from each side of the film's part of the square (bright rows or columns
   with almost no contrast, from the edge inwards), and so is an outer margin of ``MARGIN`` of
   the side (Grad-CAM's border artefacts);
3. bone is the part of the body (brighter than Otsu's threshold of the square: not air) that has
   trabecular texture (local high-pass energy above Otsu's threshold of the body's): brightness
   alone does not separate bone from the soft tissue around a knee, whose projection is a dome
   as bright as the bone's edges. The estimate is opened (3 x 3), its holes filled, pieces
   smaller than ``MIN_PIECE`` of the square dropped (markers, text) and eroded by one cell, so
   that the heat keeps off the bone's edge; it favours precision: the smooth cortex and the
   shafts are mostly left out;
4. the map is multiplied by that estimate and divided by the RAW map's maximum, not its own: a
   map whose peak lies off bone draws faintly, at the strength its bone part has;
5. the kept share (the part of the raw map's mass on the estimate) is compared with chance, the
   share a flat map over the square keeps (the estimate's area share of the square). At or below
   ``KEPT_FLOOR`` x chance the attention is not on bone more than anywhere else, and the served
   map is all zero: the overlay draws no heat and says why. On the 620-image test set that is
   the case for 368 images (59 %); a flat or random map is at chance by construction, and a map
   and its inverse (max - map) never both pass.

The served map (:attr:`OnBone.heat`, what :func:`restrict_to_bone` returns): float32 (S, S) in
[0, 1]; all zero when the map has no mass or its kept share is at or below the floor; all NaN
when no bone was found in the square (nothing to place it on: the overlay says so).

:func:`bone_share` is the measure of the evaluation (``model.evaluate``): the share of a map's
mass that falls on a reference bone mask in the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "KEPT_FLOOR",
    "MARGIN",
    "MIN_PIECE",
    "OnBone",
    "bone_estimate",
    "bone_share",
    "film_on_grid",
    "on_bone",
    "restrict_to_bone",
]

MARGIN = 0.04  # outer margin of the square left out, as a fraction of its side
MIN_PIECE = 0.01  # bone pieces smaller than this fraction of the square are dropped (markers, text)
BLANK_SPREAD = 0.04  # a line whose central 80 % of values spans less than this is blank
TEXTURE_CELLS = 7  # side of the window (grid cells) over which texture energy is averaged
_OVERSAMPLE = 2  # film pixels read per grid cell and axis, at most (before the area average)
# The map is drawn only when its share on the estimated bone exceeds this multiple of chance (the
# share a flat map keeps): 1.0 = the attention favours bone over the rest of the square at all.
KEPT_FLOOR = 1.0


def film_on_grid(
    film: np.ndarray, region: tuple[int, int, int, int], size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The film area-averaged onto a (size, size) grid over ``region`` (row0, col0, row1, col1,
    ends exclusive, possibly reaching past the film). Returns the grid (float32; NaN in cells
    whose centre lies outside the film) and the block of cells that lie on the film
    (g_row0, g_col0, g_row1, g_col1). Raises ValueError when the film's values read there are
    not all finite (a NaN film has no brightness to find bone by)."""
    img = np.asarray(film)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"film must be a non-empty 2-D array, not shape {img.shape}")
    r0, c0, r1, c1 = (int(v) for v in region)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"empty region {region}")
    h, w = img.shape
    fr, fc = size / (r1 - r0), size / (c1 - c0)  # cells per film pixel
    ir0, ir1, ic0, ic1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    grid = np.full((size, size), np.nan, np.float32)
    if ir1 <= ir0 or ic1 <= ic0:
        return grid, (0, 0, 0, 0)
    # cells whose centre lies on the film
    g0 = max(0, math.ceil((ir0 - r0) * fr - 0.5))
    g1 = min(size, math.ceil((ir1 - r0) * fr - 0.5))
    h0 = max(0, math.ceil((ic0 - c0) * fc - 0.5))
    h1 = min(size, math.ceil((ic1 - c0) * fc - 0.5))
    if g1 <= g0 or h1 <= h0:
        return grid, (0, 0, 0, 0)
    part = img[ir0:ir1, ic0:ic1]
    # never read more than _OVERSAMPLE x _OVERSAMPLE pixels per cell: a 5 Mpx film costs what a
    # small one does
    step = max(1, min(part.shape[0] // ((g1 - g0) * _OVERSAMPLE), part.shape[1] // ((h1 - h0) * _OVERSAMPLE)))
    if step > 1:
        part = part[::step, ::step]
    block = _area_resize(np.asarray(part, dtype=np.float32), (g1 - g0, h1 - h0))
    if not np.isfinite(block).all():  # checked on the grid: the pixels read, not the whole film
        raise ValueError("film has NaN or infinite values in the assessed square")
    grid[g0:g1, h0:h1] = block
    return grid, (g0, h0, g1, h1)


def _area_resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area (box) average of ``values`` down (or bilinear up) to ``shape``."""
    from PIL import Image

    if values.shape == shape:
        return values
    k = min(values.shape[0] // shape[0], values.shape[1] // shape[1])
    if k >= 2:  # whole blocks first: strided sums are cheap
        r, c = (values.shape[0] // k) * k, (values.shape[1] // k) * k
        rows = values[0:r:k].copy()
        for i in range(1, k):
            rows += values[i:r:k]
        block = rows[:, 0:c:k].copy()
        for j in range(1, k):
            block += rows[:, j:c:k]
        values = block * np.float32(1.0 / (k * k))
        if values.shape == shape:
            return values
    shrink = shape[0] <= values.shape[0] and shape[1] <= values.shape[1]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F").resize((shape[1], shape[0]), method)
    return np.asarray(out, dtype=np.float32)


def _blank_lines(lines: np.ndarray, bright: float) -> int:
    """How many of ``lines`` (rows; pass the transpose for columns), counted from the first,
    are a collimation shutter: bright (median at least ``bright``) with almost no contrast
    along the line. The spread is read between the 10th and 90th percentile, so a lead marker on
    the shutter does not count. Dark bands (air, an electronic shutter) stay: they are not bone,
    and Otsu's threshold needs the air to find the body."""
    n = lines.shape[1]
    lo, mid, hi = (n - 1) // 10, (n - 1) // 2, (n - 1) - (n - 1) // 10
    for i, line in enumerate(lines):
        part = np.partition(line, (lo, mid, hi))
        if part[hi] - part[lo] >= BLANK_SPREAD or part[mid] < bright:
            return i
    return len(lines)


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (1-D, finite): the upper edge of the darker class."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return hi
    scale = (bins - 1e-3) / (hi - lo)
    hist = np.bincount(((values - lo) * scale).astype(np.intp), minlength=bins)[:bins].astype(np.float64)
    centres = np.arange(bins, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * centres)
    w1 = w0[-1] - w0
    between = w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2
    return lo + (int(np.argmax(between[:-1])) + 1) / scale


def _erode(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary erosion (outside the array counts as background), by shifted ANDs: a tenth
    of ``ndimage.binary_erosion``'s time."""
    rows = mask.copy()
    rows[1:] &= mask[:-1]
    rows[:-1] &= mask[1:]
    rows[[0, -1]] = False
    out = rows.copy()
    out[:, 1:] &= rows[:, :-1]
    out[:, :-1] &= rows[:, 1:]
    out[:, [0, -1]] = False
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation, by shifted ORs."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole filled: background not connected to the border becomes
    foreground (cheaper than ``ndimage.binary_fill_holes``)."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    outside[0] = False
    return ~outside[labels]


def bone_estimate(grid: np.ndarray, on_film: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean (S, S) estimate of bone on ``grid`` (from :func:`film_on_grid`).

    Brightness alone does not separate bone from the soft tissue around it: the soft tissue of
    a knee projects as a dome as bright as the bone's edges. Bone is the part of the body (what
    is brighter than Otsu's threshold of the square: not air) with trabecular texture (local
    high-pass energy above Otsu's threshold of the body's), cleaned up morphologically.
    """
    size = grid.shape[0]
    keep = np.zeros(grid.shape, bool)
    g0, h0, g1, h1 = on_film
    if g1 <= g0 or h1 <= h0:
        return keep
    block = grid[g0:g1, h0:h1]
    bright = float(np.percentile(block[::3, ::3], 98)) - BLANK_SPREAD
    top, bottom = _blank_lines(block, bright), _blank_lines(block[::-1], bright)
    left, right = _blank_lines(block.T, bright), _blank_lines(block.T[::-1], bright)
    g0, g1, h0, h1 = g0 + top, g1 - bottom, h0 + left, h1 - right
    m = max(1, round(MARGIN * size))
    g0, h0, g1, h1 = max(g0, m), max(h0, m), min(g1, size - m), min(h1, size - m)
    if g1 - g0 < 8 or h1 - h0 < 8:
        return keep
    values = np.ascontiguousarray(grid[g0:g1, h0:h1])
    body = values > _otsu(values.ravel())
    if not body.any():
        return keep
    detail = values - ndimage.uniform_filter(values, 3)
    detail *= detail
    energy = ndimage.uniform_filter(detail, TEXTURE_CELLS)
    np.log(energy + np.float32(1e-6), out=energy)
    bone = body & (energy > _otsu(energy[body]))
    bone = _fill_holes(_dilate(_erode(bone)))  # opening: drops specks and one-cell bridges
    labels, n = ndimage.label(bone)
    if n:
        big = np.bincount(labels.ravel(), minlength=n + 1) >= MIN_PIECE * size * size
        big[0] = False
        bone = big[labels]
    keep[g0:g1, h0:h1] = _erode(bone)
    return keep


@dataclass(frozen=True)
class OnBone:
    """A Grad-CAM map placed on the estimated bone of its square (:func:`on_bone`)."""

    heat: np.ndarray  # the served map: float32 (S, S) in [0, 1]; zeros: not drawn; NaN: no bone found
    bone: np.ndarray  # the bone estimate, boolean (S, S)
    kept_share: float  # share of the raw map's mass on the estimate; NaN when the map has no mass
    chance_share: float  # share a flat map over the square keeps: the estimate's area share (0: no bone)

    @property
    def bone_found(self) -> bool:
        return self.chance_share > 0

    @property
    def drawn(self) -> bool:
        """Whether the attention on bone is more than chance (``KEPT_FLOOR``): the map is served."""
        return self.bone_found and bool(self.kept_share > KEPT_FLOOR * self.chance_share)


def on_bone(film: np.ndarray, region: tuple[int, int, int, int], cam: np.ndarray) -> OnBone:
    """Grad-CAM ``cam`` ((S, S) over ``region`` of ``film``) kept on the estimated bone of that
    region, scaled by the raw map's maximum, and served only when its kept share exceeds chance
    (module docstring). ``film``: the decoded film, 2-D float in [0, 1], MONOCHROME2 sense
    (bright = bone)."""
    raw = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, None)
    if raw.ndim != 2 or raw.shape[0] != raw.shape[1]:
        raise ValueError(f"cam must be a square 2-D map, not shape {raw.shape}")
    grid, on_film = film_on_grid(film, region, raw.shape[0])
    bone = bone_estimate(grid, on_film)
    total = float(raw.sum(dtype=np.float64))
    kept = raw * bone
    kept_share = float(kept.sum(dtype=np.float64)) / total if total > 0 else math.nan
    chance = float(np.count_nonzero(bone)) / bone.size
    if chance == 0:
        heat = np.full(raw.shape, np.nan, np.float32)
    elif not kept_share > KEPT_FLOOR * chance:  # NaN (no mass) too
        heat = np.zeros(raw.shape, np.float32)
    else:
        heat = kept / np.float32(raw.max())  # the raw maximum: off-bone peaks keep the bone part faint
    return OnBone(heat=heat, bone=bone, kept_share=kept_share, chance_share=chance)


def restrict_to_bone(film: np.ndarray, region: tuple[int, int, int, int], cam: np.ndarray) -> np.ndarray:
    """The served map of :func:`on_bone`: float32 (S, S) in [0, 1], all zero when the map's
    attention is not on the estimated bone more than chance (or it has no mass), all NaN when no
    bone is found in the region."""
    return on_bone(film, region, cam).heat


def bone_share(saliency: np.ndarray, bone: np.ndarray) -> float:
    """The share of ``saliency``'s mass on ``bone`` (the fraction of each cell that is bone, same
    shape); NaN when the map has no mass."""
    s = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float64)), 0.0, None)
    total = float(s.sum())
    return float((s * np.asarray(bone, dtype=np.float64)).sum() / total) if total > 0 else math.nan
