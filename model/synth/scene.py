"""Compose one synthetic knee radiograph: bone parameters from the patient's cues, pose,
exposure, nuisance objects, vendor processing and stored-value encoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.synth import acquisition as acq
from model.synth.anatomy import BoneParams, KneeShape, Pose, empty_maps, render
from model.synth.patient import Patient
from model.synth.presets import Preset

_TEXTS = ("WB", "STANDING", "AP KNEE", "SUPINE", "PORTABLE", "POST OP?", "1/2")


@dataclass
class SynthImage:
    """One generated image held in memory."""

    stored: np.ndarray  # uint16 stored pixel values as written to DICOM (MONOCHROME1 inverted)
    image: np.ndarray  # float32 [0, 1], MONOCHROME2 sense, what a viewer shows
    mask: np.ndarray  # uint8 labels: 0 background, 1 cortex, 2 trabecular region
    laterality: str
    view: str
    profile: str
    kvp: float
    magnification: float
    burned_in_text: bool


def bone_params(cues: dict[str, float], gain: float, jitter: np.ndarray) -> BoneParams:
    """Map the cue z-scores (plus per-knee ``jitter``, 6 values) to bone parameters."""
    z = {k: (cues[k] + float(j)) * gain for k, j in zip(sorted(cues), jitter, strict=True)}
    return BoneParams(
        cortex_k=float(np.clip(0.33 + 0.085 * z["cortex"], 0.10, 0.58)),
        bvtv=float(np.clip(0.30 + 0.085 * z["bvtv"], 0.05, 0.58)),
        tb_soft=float(np.clip(0.8 + 0.18 * z["tb_th"], 0.35, 1.4)),
        zoom=float(np.clip(1.0 + 0.08 * z["tb_sp"], 0.72, 1.35)),
        h_keep=float(1.0 / (1.0 + np.exp(-1.6 * (z["horizontal"] + 0.3)))),
        mineral=float(np.clip(1.0 + 0.07 * z["mineral"], 0.75, 1.25)),
    )


def knee_shape(patient: Patient, rng: np.random.Generator) -> KneeShape:
    """Per-knee anatomy; joint space narrows with osteoarthritis."""
    scale = (patient.height_m / 1.70) * float(rng.normal(1.0, 0.035))
    gap = 12.0 * scale * (1.0 - 0.22 * patient.oa_grade) * float(rng.uniform(0.85, 1.15))
    return KneeShape(
        scale=scale,
        gap=max(gap, 2.0),
        oa_grade=patient.oa_grade,
        tex_offset=(int(rng.integers(0, 512)), int(rng.integers(0, 512))),
    )


@dataclass(frozen=True)
class Knee:
    """A patient's knee: anatomy and bone quality (fixed across studies)."""

    side: str  # "L" or "R"
    shape: KneeShape
    bone: BoneParams
    #: mean of the six cue z-scores this knee shows (per-knee jitter included, gain not): what
    #: a perfect reader of its films recovers (``model.synth.ceiling``)
    cue_mean: float = 0.0


def make_knees(patient: Patient, preset: Preset, rng: np.random.Generator) -> dict[str, Knee]:
    """Both knees of a patient."""
    knees = {}
    for side in ("L", "R"):
        jitter = rng.normal(0.0, preset.knee_noise, size=6)
        cue_mean = float(np.mean([patient.cues[k] + j for k, j in zip(sorted(patient.cues), jitter, strict=True)]))
        knees[side] = Knee(side, knee_shape(patient, rng), bone_params(patient.cues, preset.cue_gain, jitter), cue_mean)
    return knees


def _lateral_sign(side: str, view: str) -> float:
    # AP view: the patient's right is on the viewer's left; the lateral side of the right knee
    # therefore lies on the image left. PA mirrors this.
    sign = -1.0 if side == "R" else 1.0
    return -sign if view == "PA" else sign


def render_image(
    rng: np.random.Generator,
    patient: Patient,
    knees: dict[str, Knee],
    preset: Preset,
    laterality: str,
    view: str,
    profile_name: str,
) -> SynthImage:
    """Render one film of ``laterality`` ("L", "R" or "B") for ``patient``."""
    profile = acq.VENDOR_PROFILES[profile_name]
    h = preset.rows
    w = preset.bilateral_cols if laterality == "B" else preset.cols
    maps = empty_maps((h, w))
    mag = float(rng.uniform(*preset.mag_range))
    theta = float(np.deg2rad(np.clip(rng.normal(0.0, preset.rotation_sd_deg), -10, 10)))
    dy = float(np.clip(rng.normal(0.0, preset.shift_fraction), -0.15, 0.15)) * h
    sides: tuple[str, ...]
    centres: tuple[float, ...]
    if laterality == "B":
        # Right knee on the viewer's left in AP.
        sides = ("R", "L") if view == "AP" else ("L", "R")
        centres = (0.27 * w, 0.73 * w)
    else:
        sides = (laterality,)
        centres = (0.5 * w + float(np.clip(rng.normal(0.0, preset.shift_fraction), -0.15, 0.15)) * w,)
    for side, cx in zip(sides, centres, strict=True):
        pose = Pose(cx=cx, cy=0.5 * h + dy, theta=theta, mag=mag, side=_lateral_sign(side, view))
        render(maps, pose, knees[side].shape, knees[side].bone, patient.bmi)
        if rng.random() < preset.implant_prob:
            _implant(maps.metal, pose, rng)

    if rng.random() < preset.marker_prob:
        letter = acq.glyph(laterality if laterality != "B" else str(rng.choice(["L", "R"])), 48)
        r = int(rng.uniform(0.03, 0.2) * h)
        c = int(rng.uniform(0.03, 0.85) * w)
        acq.stamp(maps.metal, letter, r, c, 6.0, add=True)
    collimation = None
    if rng.random() < preset.collimation_prob:
        m = rng.uniform(0.0, 0.09, size=4)
        collimation = (int(m[0] * h), h - int(m[1] * h), int(m[2] * w), w - int(m[3] * w))
    kvp = float(rng.uniform(*preset.kvp_range))
    scatter = float(np.clip(0.12 + 0.028 * (patient.bmi - 20.0) + rng.normal(0, 0.05), 0.05, 0.9))
    exposure = acq.Exposure(
        kvp=kvp,
        photons=float(np.exp(rng.uniform(*np.log(preset.photons_range)))),
        heel=float(rng.uniform(0.03, 0.12)),
        heel_axis=int(rng.integers(0, 2)),
        scatter_fraction=scatter,
    )
    mu = acq.attenuation(maps.soft, maps.cortical, maps.trabecular, maps.metal, kvp)
    counts = acq.expose(mu, exposure, profile, collimation, rng)
    exposed = np.zeros((h, w), bool)
    if collimation is None:
        exposed[:] = True
    else:
        exposed[collimation[0] : collimation[1], collimation[2] : collimation[3]] = True
    image = acq.process(counts, profile, exposed)
    text = rng.random() < preset.text_prob
    if text:
        label = acq.glyph(str(rng.choice(_TEXTS)), int(rng.integers(18, 34)))
        acq.stamp(
            image,
            label,
            int(rng.uniform(0.85, 0.95) * h),
            int(rng.uniform(0.02, 0.5) * w),
            1.0,
            add=False,
        )
    top = (1 << profile.bits_stored) - 1
    stored = np.rint(image * top).astype(np.uint16)
    if profile.photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    return SynthImage(
        stored=stored,
        image=image,
        mask=maps.mask,
        laterality=laterality,
        view=view,
        profile=profile_name,
        kvp=kvp,
        magnification=mag,
        burned_in_text=bool(text),
    )


def _implant(metal: np.ndarray, pose: Pose, rng: np.random.Generator) -> None:
    """A plate with screws over the proximal tibia or distal femur (rare)."""
    h, w = metal.shape
    v0 = pose.cy + pose.mag * (rng.choice([-1.0, 1.0]) * rng.uniform(120, 260))
    c0 = pose.cx + pose.mag * rng.uniform(-60, 60)
    r0, r1 = int(max(v0 - 90 * pose.mag, 0)), int(min(v0 + 90 * pose.mag, h))
    c_lo, c_hi = int(max(c0 - 9 * pose.mag, 0)), int(min(c0 + 9 * pose.mag, w))
    if r0 < r1 and c_lo < c_hi:
        metal[r0:r1, c_lo:c_hi] += 4.0
    for k in range(4):
        rr = int(v0 + (k - 1.5) * 45 * pose.mag)
        if 0 <= rr < h:
            metal[max(rr - 5, 0) : rr + 5, int(max(c0 - 60, 0)) : int(min(c0 + 60, w))] += 3.0
