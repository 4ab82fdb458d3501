"""The texture stage: bone-texture features at full resolution, fused with STR-Net's outputs.

Why: the network sees the knee at 256 px (a 3.4-fold reduction of a 1024-row film), where the
trabecular pattern (period 8 to 17 px on the film) is at or below the Nyquist limit; severity
(osteoporosis against osteopenia) depends on exactly that fine structure. This stage measures it
on the decoded film itself, in the spirit of radiographic texture analysis:

- spectral features: 44 Hann-windowed 128 px patches on an 11 x 4 grid around the joint (rows
  every 50 px from -250 to +250, columns at -96, -32, +32, +96 px from the film's centre), per
  patch the share of spectral power in 7 period bands (3 to 64 px), for trabeculae across and
  along the bone axis, plus patch mean, contrast and mean gradients; pooled (mean, min, max, per
  grid row, per grid column). The windows overlap (Welch's method): a Hann window weighs its
  patch's edges near zero, so abutting windows leave much of the bone unread, and the readout is
  limited by the bone area read (feature version 1, 14 abutting windows, read the knee's bone
  cues with a residual SD of 0.243; this grid 0.196; docs/adr/0017);
- shaft features: quantiles and edge strength of the mean column profile in four bands of rows
  near the top and bottom of the film (femoral and tibial shaft: cortical thickness).

A ridge-regularised logistic model (severity) and a ridge regression (T-score) on the
standardised features are fitted on the training split; a three-parameter stack per task
(``a * network + b * texture + c``) is fitted on the validation split. Everything is stored as
plain numbers in the checkpoint's JSON metadata: no pickles.

The geometry assumes a knee film of about 0.2 mm pixels; other sizes are resampled to 1024 rows
first (``CANONICAL_ROWS``). A site with another geometry recalibrates (``strnet model
calibrate``) and can refit the stage (``strnet model fit-texture``).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.fitting import add_intercept, fit_logistic, fit_ridge

FEATURE_VERSION = 2
CANONICAL_ROWS = 1024
PATCH = 128
ROW_OFFSETS = tuple(range(-250, 251, 50))  # px from the film's centre, canonical rows
COL_OFFSETS = (-96, -32, 32, 96)
BANDS = ((3, 5), (5, 7), (7, 9), (9, 12), (12, 16), (16, 24), (24, 64))  # period, px
SHAFT_ROWS = ((30, 110), (110, 190), (-190, -110), (-110, -30))  # negative: from the bottom


def _spectral_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per rfft2 bin: its feature slot (band index, +len(BANDS) along the bone axis; -1 outside
    every band), and the Hann window."""
    fr = np.fft.fftfreq(PATCH)  # along rows
    fc = np.fft.rfftfreq(PATCH)  # along columns
    fv, fu = np.meshgrid(fr, fc, indexing="ij")
    period = 1.0 / (np.hypot(fv, fu) + 1e-9)
    along = ~(np.abs(fu) > np.abs(fv))  # power varying along rows: across the bone axis is False
    slot = np.full(period.shape, -1, np.intp)
    for i, (lo, hi) in enumerate(BANDS):
        band = (period >= lo) & (period < hi)
        slot[band] = i + len(BANDS) * along[band]
    window = (np.hanning(PATCH)[:, None] * np.hanning(PATCH)[None, :]).astype(np.float32)
    return slot, window


_SLOT, _WINDOW = _spectral_tables()
_IN_BAND = (_SLOT >= 0).ravel()
_SLOTS = _SLOT.ravel()[_IN_BAND]
N_SLOTS = 2 * len(BANDS)
N_PATCH_FEATURES = N_SLOTS + 4
N_FEATURES = N_PATCH_FEATURES * (3 + len(ROW_OFFSETS) + len(COL_OFFSETS)) + 9 * len(SHAFT_ROWS)


class _Canonical:
    """The film in canonical geometry (``CANONICAL_ROWS`` rows, aspect kept), [0, 1] by its own
    1st and 99th percentiles, resampled only where it is read: a 2500 x 2000 film costs the
    resampling of the patch grid and of four row profiles, not of the whole film."""

    def __init__(self, pixels: np.ndarray) -> None:
        x = np.asarray(pixels, dtype=np.float32)
        if x.ndim != 2 or min(x.shape) < 1:
            raise ValueError(f"texture features need a 2-D image, not shape {x.shape}")
        self.x = x
        h, w = x.shape
        self.rows = CANONICAL_ROWS
        self.cols = w if h == CANONICAL_ROWS else max(1, int(round(w * CANONICAL_ROWS / h)))
        step = max(1, int(round(4 * h / CANONICAL_ROWS)))  # every 4th canonical pixel
        lo, hi = np.percentile(x[::step, ::step], [1, 99])
        self.lo = np.float32(lo)
        self.span = np.float32(max(hi - lo, 1e-6))

    def region(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Canonical rows ``[r0, r1)`` and columns ``[c0, c1)`` (inside the canonical frame)."""
        from model.preprocess import _area_axis, _block_mean

        h, w = self.x.shape
        if (h, w) == (self.rows, self.cols):
            out = self.x[r0:r1, c0:c1]
        else:
            fr, fc = h / self.rows, w / self.cols
            a = min(h - 1, int(np.floor(r0 * fr)))
            b = min(h, max(int(np.ceil(r1 * fr)), a + 1))
            c = min(w - 1, int(np.floor(c0 * fc)))
            d = min(w, max(int(np.ceil(c1 * fc)), c + 1))
            sub = self.x[a:b, c:d]
            k = int(min(fr, fc))
            if k >= 2 and min(sub.shape) >= k:  # integer block means first (cheap), then exact area
                sub = _block_mean(sub, k)
            out = sub if sub.shape[0] == r1 - r0 else _area_axis(sub, r1 - r0, 0)
            out = out if out.shape[1] == c1 - c0 else _area_axis(out, c1 - c0, 1)
        return (out - self.lo) / self.span

    def profile(self, r0: int, r1: int) -> np.ndarray:
        """The mean over canonical rows ``[r0, r1)`` of every canonical column, (cols,). A
        resampled film averages its own rows first, then resamples the one profile."""
        from model.preprocess import _area_axis

        h, w = self.x.shape
        if (h, w) == (self.rows, self.cols):
            return self.region(r0, r1, 0, self.cols).mean(axis=0)
        f = h / self.rows
        a = min(h - 1, int(np.floor(r0 * f)))
        b = min(h, max(int(np.ceil(r1 * f)), a + 1))
        line = self.x[a:b].mean(axis=0, dtype=np.float64).astype(np.float32)
        line = line if w == self.cols else _area_axis(line[None], self.cols, 1)[0]
        return (line - self.lo) / self.span


def _patch(x: np.ndarray, r_centre: int, c_centre: int) -> np.ndarray:
    """A PATCH x PATCH window, clamped inside the film (edge-padded when the film is smaller)."""
    h, w = x.shape
    if h < PATCH or w < PATCH:
        x = np.pad(x, ((0, max(0, PATCH - h)), (0, max(0, PATCH - w))), mode="edge")
        h, w = x.shape
    r0 = int(np.clip(r_centre - PATCH // 2, 0, h - PATCH))
    c0 = int(np.clip(c_centre - PATCH // 2, 0, w - PATCH))
    return x[r0 : r0 + PATCH, c0 : c0 + PATCH]


def _patches(film: _Canonical) -> np.ndarray:
    """The grid's windows, (len(ROW_OFFSETS) * len(COL_OFFSETS), PATCH, PATCH), row-major."""
    h, w = film.rows, film.cols
    centres = [(h // 2 + dr, w // 2 + dc) for dr in ROW_OFFSETS for dc in COL_OFFSETS]
    if w < PATCH:  # narrower than a window: read the whole (small) film and pad
        x = film.region(0, h, 0, w)
        return np.stack([_patch(x, r, c) for r, c in centres])
    corners = [
        (int(np.clip(r - PATCH // 2, 0, h - PATCH)), int(np.clip(c - PATCH // 2, 0, w - PATCH))) for r, c in centres
    ]
    top, left = min(r for r, _ in corners), min(c for _, c in corners)
    bottom, right = max(r for r, _ in corners) + PATCH, max(c for _, c in corners) + PATCH
    x = film.region(top, bottom, left, right)
    return np.stack([x[r - top : r - top + PATCH, c - left : c - left + PATCH] for r, c in corners])


def _patch_features(patches: np.ndarray) -> np.ndarray:
    """(P, PATCH, PATCH) windows to (P, N_PATCH_FEATURES): the log share of in-band spectral
    power per band and direction, mean, log contrast and log mean gradients (one batched FFT)."""
    n = len(patches)
    mean = patches.mean(axis=(1, 2))
    power = np.abs(np.fft.rfft2((patches - mean[:, None, None]) * _WINDOW)) ** 2
    inband = power.reshape(n, -1)[:, _IN_BAND]
    offsets = (np.arange(n)[:, None] * N_SLOTS + _SLOTS[None, :]).ravel()
    per_slot = np.bincount(offsets, weights=inband.ravel(), minlength=n * N_SLOTS).reshape(n, N_SLOTS)
    total = per_slot.sum(axis=1, keepdims=True) + 1e-9
    gx = np.abs(np.diff(patches, axis=2)).mean(axis=(1, 2))
    gy = np.abs(np.diff(patches, axis=1)).mean(axis=(1, 2))
    std = patches.std(axis=(1, 2))
    extra = np.stack([mean, np.log(std + 1e-6), np.log(gx + 1e-6), np.log(gy + 1e-6)], axis=1)
    return np.concatenate([np.log(per_slot / total + 1e-9), extra], axis=1)


def _shaft_features(profile: np.ndarray) -> list[float]:
    p = np.convolve(profile, np.ones(5, np.float32) / 5, mode="same")
    n = len(p)
    core = p[n // 6 : n - n // 6] if n >= 6 else p
    q = np.percentile(core, [5, 25, 50, 75, 95])
    d = np.abs(np.diff(core)) if len(core) > 1 else np.zeros(1)
    return [*q, q[4] - q[2], float(d.max()), float(np.percentile(d, 90)), q[4] - q[0]]


def texture_features(pixels: np.ndarray) -> np.ndarray:
    """The stage's feature vector (float32, ``N_FEATURES``) of a decoded film ([0, 1], bright =
    bone, any size). Deterministic."""
    film = _Canonical(pixels)
    flat = _patch_features(_patches(film))
    grid = flat.reshape(len(ROW_OFFSETS), len(COL_OFFSETS), N_PATCH_FEATURES)
    pooled = [flat.mean(0), flat.min(0), flat.max(0), grid.mean(1).ravel(), grid.mean(0).ravel()]
    h = film.rows
    shaft = []
    for r0, r1 in SHAFT_ROWS:
        a, b = (r0, r1) if r0 >= 0 else (h + r0, h + r1)
        shaft += _shaft_features(film.profile(a, b))
    out = np.concatenate([*pooled, np.asarray(shaft)]).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _features_of_file(path: str) -> np.ndarray:
    from model.io import read_pixels

    return texture_features(read_pixels(Path(path)))


def texture_matrix(paths: list[Any], workers: int = 2, progress: bool = False) -> np.ndarray:
    """Features of many files: (N, N_FEATURES) float32 (decodes each file once more)."""
    from tqdm import tqdm

    jobs = [str(p) for p in paths]
    out = np.empty((len(jobs), N_FEATURES), np.float32)
    bar = tqdm(total=len(jobs), desc="texture features", unit="img", disable=not progress)
    if workers <= 1:
        results: Any = map(_features_of_file, jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_features_of_file, jobs, chunksize=8)
    try:
        for i, f in enumerate(results):
            out[i] = f
            bar.update()
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown()
    return out


# -- fitting (the regressions: model.fitting) --------------------------------------------------


@dataclass
class TextureStage:
    """Fitted texture models and the per-task stacks (all plain floats)."""

    mean: np.ndarray
    scale: np.ndarray
    w_severity: np.ndarray  # logistic, on the standardised features + intercept
    w_tscore: np.ndarray  # ridge, same design
    stack_severity: tuple[float, float, float]  # a * network logit + b * texture logit + c
    stack_tscore: tuple[float, float, float]  # a * network T + b * texture T + c
    l2: float
    feature_version: int = FEATURE_VERSION

    def texture_outputs(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.mean):
            raise ValueError(f"expected texture features of shape (N, {len(self.mean)}), got {f.shape}")
        x = add_intercept((f - self.mean) / self.scale)
        return x @ self.w_severity, x @ self.w_tscore

    def apply(self, raw: dict[str, np.ndarray], feats: np.ndarray) -> dict[str, np.ndarray]:
        """Network outputs with ``severity_logit`` and ``tscore`` replaced by the fused values;
        the network's own are kept as ``network_severity_logit`` and ``network_tscore``."""
        tex_sev, tex_t = self.texture_outputs(feats)
        a, b, c = self.stack_severity
        ta, tb, tc = self.stack_tscore
        out = dict(raw)
        out["network_severity_logit"] = raw["severity_logit"]
        out["network_tscore"] = raw["tscore"]
        out["severity_logit"] = (a * raw["severity_logit"] + b * tex_sev + c).astype(np.float32)
        out["tscore"] = (ta * raw["tscore"] + tb * tex_t + tc).astype(np.float32)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_version": self.feature_version,
            "n_features": len(self.mean),
            "l2": self.l2,
            "mean": [float(v) for v in self.mean],
            "scale": [float(v) for v in self.scale],
            "w_severity": [float(v) for v in self.w_severity],
            "w_tscore": [float(v) for v in self.w_tscore],
            "stack_severity": [float(v) for v in self.stack_severity],
            "stack_tscore": [float(v) for v in self.stack_tscore],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextureStage:
        version = int(d.get("feature_version", 0))
        if version != FEATURE_VERSION:
            raise ValueError(f"texture stage has feature version {version}; this build computes {FEATURE_VERSION}")
        n = int(d["n_features"])
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "w_severity", "w_tscore")}
        if n != N_FEATURES or any(len(v) != n + (k.startswith("w_")) for k, v in arrays.items()):
            raise ValueError("texture stage arrays do not match the feature count")
        sev, ts = (tuple(float(v) for v in d[k]) for k in ("stack_severity", "stack_tscore"))
        if len(sev) != 3 or len(ts) != 3:
            raise ValueError("texture stage stacks need three numbers each")
        return cls(stack_severity=sev, stack_tscore=ts, l2=float(d["l2"]), feature_version=version, **arrays)


def fit_stage(
    feats: np.ndarray,
    targets: dict[str, np.ndarray],
    raw: dict[str, np.ndarray],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    l2: float = 10.0,
) -> TextureStage:
    """Texture models on ``train_idx``, stacks on ``val_idx`` against the network's ``raw``
    outputs for those same validation images (``raw`` is indexed like ``val_idx``)."""
    f = np.asarray(feats, dtype=np.float64)
    mean = f[train_idx].mean(0)
    scale = f[train_idx].std(0) + 1e-6
    z = (f - mean) / scale
    label, severity, tscore = targets["label"], targets["severity"], targets["tscore"]
    sev_ok = (label == 1) & np.isfinite(severity)
    t_ok = np.isfinite(tscore)
    tr_sev = train_idx[sev_ok[train_idx]]
    tr_t = train_idx[t_ok[train_idx]]
    if len(tr_sev) < 10 or len(np.unique(severity[tr_sev])) < 2 or len(tr_t) < 10:
        raise ValueError("too few labelled training images to fit the texture stage")
    w_sev = fit_logistic(z[tr_sev], severity[tr_sev], l2)
    w_t = fit_ridge(add_intercept(z[tr_t]), tscore[tr_t], l2)
    stage = TextureStage(mean, scale, w_sev, w_t, (1.0, 0.0, 0.0), (1.0, 0.0, 0.0), l2)
    tex_sev, tex_t = stage.texture_outputs(f[val_idx])
    v_sev = sev_ok[val_idx]
    v_t = t_ok[val_idx]
    if v_sev.sum() >= 10 and len(np.unique(severity[val_idx][v_sev])) == 2:
        xs = np.c_[raw["severity_logit"][v_sev], tex_sev[v_sev]]
        ws = fit_logistic(xs, severity[val_idx][v_sev], 1e-3)
        stage.stack_severity = (float(ws[0]), float(ws[1]), float(ws[2]))
    if v_t.sum() >= 10:
        xt = np.c_[raw["tscore"][v_t], tex_t[v_t], np.ones(int(v_t.sum()))]
        wt = np.linalg.lstsq(xt, tscore[val_idx][v_t], rcond=None)[0]
        stage.stack_tscore = (float(wt[0]), float(wt[1]), float(wt[2]))
    return stage
