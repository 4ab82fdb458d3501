"""Knee bone phantom in an AP projection: path lengths through soft tissue, cortex and
trabecular bone, plus ground-truth masks.

Coordinates: anatomical ``(u, v)`` in nominal pixels, ``u`` medial-lateral (positive = lateral),
``v`` proximal-distal (positive = distal), joint line at ``v = 0``. Long bones are modelled as
tubes with elliptical cross-section: the projected path through a tube of normalised radial
coordinate ``rho`` is ``D sqrt(1 - rho^2)``, and through its marrow cavity
``D sqrt((1 - k)^2 - rho^2)`` for relative cortical thickness ``k``; the difference is the
cortical path, which is why the shaft shows bright cortical edges whose thickness tracks BMD.
Every function works on a bounding box only, for speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.synth.texture import sample_tiles, threshold_for_fraction

CORTEX, TRABECULAR = 1, 2  # label values of the ground-truth mask


@dataclass(frozen=True)
class BoneParams:
    """Bone-quality parameters of one knee (derived from the patient's cue z-scores)."""

    cortex_k: float  # shaft cortical thickness / shaft half-width
    bvtv: float  # trabecular bone area fraction
    tb_soft: float  # ramp width of the trabecular threshold (thicker = blurrier rods)
    zoom: float  # texture frequency factor (higher = finer, denser spacing)
    h_keep: float  # fraction of horizontal trabeculae kept (lost first in bone loss)
    mineral: float  # bone attenuation factor (degree of mineralisation)


@dataclass(frozen=True)
class KneeShape:
    """Size and pose of one knee's anatomy (per patient, mirrored by side)."""

    scale: float  # overall anatomical scale (sex and height)
    gap: float  # half joint-space width, px (narrower with osteoarthritis)
    oa_grade: int
    tex_offset: tuple[int, int]


@dataclass(frozen=True)
class Pose:
    """Similarity transform from image pixels to anatomical coordinates."""

    cx: float
    cy: float
    theta: float  # radians
    mag: float
    side: float  # +1: lateral to image right; -1: lateral to image left

    def grid(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Anatomical (u, v) for image rows r0:r1, columns c0:c1 (float32)."""
        rr = np.arange(r0, r1, dtype=np.float32)[:, None] - self.cy
        cc = np.arange(c0, c1, dtype=np.float32)[None, :] - self.cx
        ct, st = (
            np.float32(np.cos(self.theta) / self.mag),
            np.float32(np.sin(self.theta) / self.mag),
        )
        u = (cc * ct + rr * st) * np.float32(self.side)
        v = rr * ct - cc * st
        return u, v

    def bbox(
        self, u0: float, u1: float, v0: float, v1: float, shape: tuple[int, int]
    ) -> tuple[int, int, int, int] | None:
        """Image bounding box (r0, r1, c0, c1) of an anatomical box, clipped; None if empty."""
        us = np.array([u0, u1, u0, u1]) * self.side
        vs = np.array([v0, v0, v1, v1])
        c = self.cx + self.mag * (us * np.cos(self.theta) - vs * np.sin(self.theta))
        r = self.cy + self.mag * (us * np.sin(self.theta) + vs * np.cos(self.theta))
        r0, r1 = max(int(r.min()) - 2, 0), min(int(r.max()) + 3, shape[0])
        c0, c1 = max(int(c.min()) - 2, 0), min(int(c.max()) + 3, shape[1])
        if r0 >= r1 or c0 >= c1:
            return None
        return r0, r1, c0, c1


def _smooth(x: np.ndarray) -> np.ndarray:
    """Smoothstep on [0, 1] (clipped), in place on ``x``."""
    x = np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)
    return x * x * (3.0 - 2.0 * x)


@dataclass
class Maps:
    """Projected path lengths (px) and the label mask, all full-frame."""

    soft: np.ndarray
    cortical: np.ndarray
    trabecular: np.ndarray  # mineralised trabecular path (already weighted by the pattern)
    metal: np.ndarray
    mask: np.ndarray  # uint8 labels: 0 background, 1 cortex, 2 trabecular region


def _tube(
    u: np.ndarray,
    v: np.ndarray,
    centre: np.ndarray | float,
    half_w: np.ndarray,
    depth: np.ndarray,
    k: np.ndarray,
    inside: np.ndarray,
    taper: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Total, cortical and marrow path through a tube; and the radial coordinate."""
    rho = np.abs(u - centre) / half_w
    rho2 = rho * rho
    outer = depth * np.sqrt(np.clip(1.0 - rho2, 0.0, None)) * taper * inside
    inner_r = np.clip(1.0 - k, 0.0, None)
    marrow = depth * np.sqrt(np.clip(inner_r * inner_r - rho2, 0.0, None)) * taper * inside
    return outer, outer - marrow, marrow, rho


def _trabecular_pattern(u: np.ndarray, v: np.ndarray, bone: BoneParams, shape: KneeShape) -> np.ndarray:
    """Trabecular bone fraction in [0, 1] at (u, v): vertical rods plus surviving horizontals."""
    f = sample_tiles(u, v, bone.zoom, shape.tex_offset)
    frac_v = 0.62 * bone.bvtv
    frac_h = 0.38 * bone.bvtv * bone.h_keep
    pv = np.clip((f[..., 0] - threshold_for_fraction(frac_v)) / bone.tb_soft + 0.5, 0.0, 1.0)
    ph = np.clip((f[..., 1] - threshold_for_fraction(frac_h)) / bone.tb_soft + 0.5, 0.0, 1.0)
    return np.maximum(pv, ph)


def empty_maps(out_shape: tuple[int, int]) -> Maps:
    """Zeroed full-frame maps."""
    return Maps(
        soft=np.zeros(out_shape, np.float32),
        cortical=np.zeros(out_shape, np.float32),
        trabecular=np.zeros(out_shape, np.float32),
        metal=np.zeros(out_shape, np.float32),
        mask=np.zeros(out_shape, np.uint8),
    )


def render(maps: Maps, pose: Pose, shape: KneeShape, bone: BoneParams, bmi: float) -> None:
    """Render one knee (soft tissue, femur, tibia, fibula, patella) into ``maps`` (in place)."""
    out_shape = maps.soft.shape
    _soft_tissue(maps, pose, shape.scale, bmi, out_shape)
    _femur(maps, pose, shape, bone, out_shape)
    _tibia(maps, pose, shape, bone, out_shape)
    _fibula(maps, pose, shape, bone, out_shape)
    _patella(maps, pose, shape, bone, out_shape)


def _vtable(v: np.ndarray, fn) -> list[np.ndarray]:
    """Evaluate 1-D profiles ``fn(v_1d) -> tuple of arrays`` at integer steps of ``v`` and
    gather them back onto the 2-D grid: many full-frame passes become one gather each."""
    v0 = float(np.floor(v.min()))
    n = int(np.ceil(v.max()) - v0) + 2
    idx = (v - np.float32(v0)).astype(np.intp)
    grid = (v0 + 0.5 + np.arange(n)).astype(np.float32)
    return [np.asarray(t, dtype=np.float32)[idx] for t in fn(grid)]


def _soft_tissue(maps: Maps, pose: Pose, s: float, bmi: float, out_shape: tuple[int, int]) -> None:
    # Leg half-width grows with BMI (fat envelope); thickness is an ellipse-like profile.
    hw0 = 235.0 * s * (bmi / 27.0) ** 0.6
    box = pose.bbox(-1.6 * hw0, 1.6 * hw0, -2000, 2000, out_shape)
    if box is None:
        return
    r0, r1, c0, c1 = box
    u, v = pose.grid(r0, r1, c0, c1)

    def profile(vv: np.ndarray) -> tuple[np.ndarray, ...]:
        # Thigh above, narrower leg below the knee.
        hw = hw0 * (1.0 + 0.12 * _smooth((-vv - 150.0) / 300.0) - 0.10 * _smooth((vv - 100.0) / 300.0))
        return (1.0 / hw, 1.8 * hw)

    inv_hw, scale = _vtable(v, profile)
    u *= inv_hw
    np.multiply(u, u, out=u)
    np.subtract(1.0, u, out=u)
    np.maximum(u, 0.0, out=u)
    leg = np.sqrt(u, out=u)
    leg *= scale
    np.maximum(maps.soft[r0:r1, c0:c1], leg, out=maps.soft[r0:r1, c0:c1])


def _write(
    maps: Maps,
    box: tuple[int, int, int, int],
    cortical: np.ndarray,
    trab: np.ndarray,
    cortex_mask: np.ndarray,
    trab_mask: np.ndarray,
) -> None:
    r0, r1, c0, c1 = box
    maps.cortical[r0:r1, c0:c1] += cortical
    maps.trabecular[r0:r1, c0:c1] += trab
    m = maps.mask[r0:r1, c0:c1]
    m[trab_mask & (m == 0)] = TRABECULAR
    m[cortex_mask] = CORTEX


def _trab_rows(tw: np.ndarray) -> slice:
    """Row range where trabecular bone is present (pattern is computed there only)."""
    rows = np.flatnonzero(tw.max(axis=1) > 0.0)
    if rows.size == 0:
        return slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1)


def _epiphysis(
    maps: Maps,
    box: tuple[int, int, int, int],
    u: np.ndarray,
    v: np.ndarray,
    centre: np.ndarray | float,
    half_w: np.ndarray,
    depth: np.ndarray,
    k: np.ndarray,
    tw: np.ndarray,
    below: np.ndarray,
    bone: BoneParams,
    shape: KneeShape,
    tex_shift: float,
) -> None:
    """Shared part of femur and tibia; ``below`` = distance inside from the joint surface."""
    s = shape.scale
    inside = below > 0.0
    taper = np.sqrt(np.clip(below / (35.0 * s), 0.0, 1.0))
    _, cort, marrow, rho = _tube(u, v, centre, half_w, depth, k, inside, taper)
    rows = _trab_rows(tw)
    trab = marrow * np.float32(0.04)
    pattern = _trabecular_pattern(u[rows] + tex_shift, v[rows], bone, shape)
    pattern *= tw[rows]
    if shape.oa_grade:
        pattern *= 1.0 + _sclerosis(below[rows], shape, s)
    trab[rows] += marrow[rows] * pattern
    # Subchondral bone plate: a thin dense layer under the articular surface.
    in_bone = inside & (rho < 1.0)
    cort += np.clip(1.0 - below / (7.0 * s), 0.0, 1.0) * in_bone * depth * 0.12
    cortex_mask = inside & (rho > 1.0 - k) & (rho <= 1.0)
    trab_mask = inside & (rho <= 1.0 - k) & (tw > 0.5) & (below > 8.0 * s)
    _write(maps, box, cort * bone.mineral, trab * bone.mineral, cortex_mask, trab_mask)


def _femur(maps: Maps, pose: Pose, shape: KneeShape, bone: BoneParams, out_shape) -> None:
    s = shape.scale
    box = pose.bbox(-190 * s, 190 * s, -2000, 0, out_shape)
    if box is None:
        return
    u, v = pose.grid(*box)
    w_shaft, w_epi = 58.0 * s, 158.0 * s

    def profile(vv: np.ndarray) -> tuple[np.ndarray, ...]:
        t = _smooth((vv + 330.0 * s) / (250.0 * s))  # 0 in shaft, 1 at the condyles
        half_w = w_shaft + (w_epi - w_shaft) * t
        depth = half_w * (2.0 - 0.75 * t)  # condyles are wider than deep
        k = bone.cortex_k * (1.0 - t) + (6.0 * s / half_w) * t  # thick shaft cortex to shell
        tw = _smooth((vv + 360.0 * s) / (120.0 * s))  # trabecular bone towards the metaphysis
        return half_w, depth, k, tw

    half_w, depth, k, tw = _vtable(v, profile)
    # Distal end: rounded condyles with an intercondylar notch.
    un = u / half_w
    v_end = -shape.gap - 22.0 * s * un**4 - 38.0 * s * np.exp(-((u / (26.0 * s)) ** 2))
    _epiphysis(maps, box, u, v, 0.0, half_w, depth, k, tw, v_end - v, bone, shape, 0.0)
    if shape.oa_grade >= 2:
        _osteophytes(maps, pose, shape, bone, out_shape, femoral=True)


def _tibia(maps: Maps, pose: Pose, shape: KneeShape, bone: BoneParams, out_shape) -> None:
    s = shape.scale
    box = pose.bbox(-175 * s, 175 * s, 0, 2000, out_shape)
    if box is None:
        return
    u, v = pose.grid(*box)
    w_shaft, w_epi = 46.0 * s, 150.0 * s

    def profile(vv: np.ndarray) -> tuple[np.ndarray, ...]:
        t = 1.0 - _smooth((vv - 60.0 * s) / (230.0 * s))
        half_w = w_shaft + (w_epi - w_shaft) * t
        return (
            6.0 * s * (1.0 - t),
            half_w,
            half_w * (2.0 - 0.85 * t),
            bone.cortex_k * 0.9 * (1.0 - t) + (5.0 * s / half_w) * t,
            1.0 - _smooth((vv - 300.0 * s) / (120.0 * s)),
        )

    centre, half_w, depth, k, tw = _vtable(v, profile)
    un = (u - centre) / half_w
    spines = 16.0 * s * (np.exp(-(((u - 14 * s) / (11.0 * s)) ** 2)) + np.exp(-(((u + 12 * s) / (11.0 * s)) ** 2)))
    v_top = shape.gap + 14.0 * s * un**6 - spines
    _epiphysis(maps, box, u, v, centre, half_w, depth, k, tw, v - v_top, bone, shape, 1000.0)
    if shape.oa_grade >= 2:
        _osteophytes(maps, pose, shape, bone, out_shape, femoral=False)


def _fibula(maps: Maps, pose: Pose, shape: KneeShape, bone: BoneParams, out_shape) -> None:
    s = shape.scale
    cu, top = 142.0 * s, 58.0 * s + shape.gap
    box = pose.bbox(cu - 45 * s, cu + 45 * s, top, 2000, out_shape)
    if box is None:
        return
    u, v = pose.grid(*box)
    t = 1.0 - _smooth((v - top - 40.0 * s) / (70.0 * s))
    half_w = 13.0 * s + 22.0 * s * t
    centre = cu + 8.0 * s * (1.0 - t)
    un = (u - centre) / half_w
    v_top = top + 14.0 * s * un * un
    inside = v > v_top
    taper = np.sqrt(np.clip((v - v_top) / (18.0 * s), 0.0, 1.0))
    k = bone.cortex_k * 0.8 * (1.0 - t) + (4.0 * s / half_w) * t
    _, cort, marrow, rho = _tube(u, v, centre, half_w, half_w * 1.8, k, inside, taper)
    trab = marrow * (t * 0.6 * bone.bvtv + 0.04)
    cortex_mask = inside & (rho > 1.0 - k) & (rho <= 1.0)
    _write(maps, box, cort * bone.mineral, trab * bone.mineral, cortex_mask, cortex_mask & False)


def _patella(maps: Maps, pose: Pose, shape: KneeShape, bone: BoneParams, out_shape) -> None:
    # Superimposed on the distal femur in AP: a faint dome, a cue-free density confounder.
    s = shape.scale
    cu, cv, au, av = 12.0 * s, -95.0 * s, 46.0 * s, 58.0 * s
    box = pose.bbox(cu - au, cu + au, cv - av, cv + av, out_shape)
    if box is None:
        return
    u, v = pose.grid(*box)
    rho2 = ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2
    dome = np.sqrt(np.clip(1.0 - rho2, 0.0, None)) * (40.0 * s)
    r0, r1, c0, c1 = box
    maps.cortical[r0:r1, c0:c1] += dome * 0.18 * bone.mineral
    maps.trabecular[r0:r1, c0:c1] += dome * 0.22


def _sclerosis(depth_below_surface: np.ndarray, shape: KneeShape, s: float) -> np.ndarray:
    """Subchondral sclerosis: extra density under the articular surface, OA-driven only."""
    if shape.oa_grade == 0:
        return np.float32(0.0)  # type: ignore[return-value]
    band = np.exp(-np.clip(depth_below_surface, 0.0, None) / (18.0 * s))
    return (0.45 * shape.oa_grade) * band


def _osteophytes(maps: Maps, pose: Pose, shape: KneeShape, bone: BoneParams, out_shape, femoral: bool) -> None:
    s = shape.scale
    size = (6.0 + 5.0 * shape.oa_grade) * s
    vv = -shape.gap - 10.0 * s if femoral else shape.gap + 10.0 * s
    for uu in (-160.0 * s, 160.0 * s):
        box = pose.bbox(uu - size, uu + size, vv - size, vv + size, out_shape)
        if box is None:
            continue
        u, v = pose.grid(*box)
        rho2 = ((u - uu) / size) ** 2 + ((v - vv) / (0.7 * size)) ** 2
        spur = np.sqrt(np.clip(1.0 - rho2, 0.0, None)) * size * 1.2 * bone.mineral
        r0, r1, c0, c1 = box
        maps.cortical[r0:r1, c0:c1] += spur
