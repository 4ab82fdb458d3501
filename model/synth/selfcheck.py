"""Leak and signal self-check of the synthetic generator (no disk, no sklearn).

Run ``python -m model.synth.selfcheck --n 400 --seed 11``. On ``n`` in-memory images that go
through the real serving path (DICOM dataset -> ``read_pixels`` -> ``preprocess``) it reports:

- clinical-only logistic AUROC (age, sex, BMI, missingness indicators), trained on half of the
  patients and scored on the other half, both on 4,000 sampled patients and on the image set
  (target about 0.70 to 0.75, must stay <= 0.78);
- global-mean-intensity AUROC of the preprocessed image, reported as max(A, 1 - A)
  (must stay <= 0.62, aim < 0.60); the same for the raw decoded image;
- Pearson r of simple hand-crafted image features (trabecular-region mean, SD and high-pass
  texture SD in the preprocessed image) with the T-score, showing that the bone signal is
  present but not as a simple brightness shortcut.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from model.io import read_pixels
from model.preprocess import PreprocessSpec, preprocess, resize_mask
from model.synth.acquisition import VENDOR_PROFILES, box_blur
from model.synth.anatomy import CORTEX, TRABECULAR
from model.synth.dicom_writer import build_dataset
from model.synth.generate import patient_images
from model.synth.patient import sample_patient


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks for ties."""
    s = np.asarray(scores, float)
    y = np.asarray(labels).astype(bool)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 3000) -> np.ndarray:
    """Tiny L2 logistic regression by gradient descent on standardised features."""
    w = np.zeros(x.shape[1] + 1)
    xb = np.c_[np.ones(len(x)), x]
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-xb @ w))
        grad = xb.T @ (p - y) / len(y) + l2 * np.r_[0.0, w[1:]]
        w -= 0.5 * grad
    return w


def _clinical_matrix(rows: list[dict]) -> np.ndarray:
    age = np.array([r["age"] for r in rows], float)
    sex = np.array([r["sex"] for r in rows])
    bmi = np.array([np.nan if r["bmi"] is None else r["bmi"] for r in rows], float)
    bmi_missing = np.isnan(bmi)
    bmi = np.where(bmi_missing, np.nanmean(bmi), bmi)
    cols = [
        age,
        (sex == "F").astype(float),
        (sex == "").astype(float),
        bmi,
        bmi_missing.astype(float),
    ]
    x = np.stack(cols, axis=1)
    return (x - x.mean(0)) / np.maximum(x.std(0), 1e-9)


def _clinical_patients(seed: int, preset: str, n: int = 4000) -> float:
    """Clinical-only AUROC on many patients (no images needed): fit on half, score the rest."""
    from model.synth.presets import get_preset

    model = get_preset(preset).patient
    pats = [sample_patient(np.random.default_rng([seed, 7, i]), i, model) for i in range(n)]
    rows = [{"age": p.age, "sex": p.sex_recorded, "bmi": p.bmi_recorded} for p in pats]
    x = _clinical_matrix(rows)
    y = np.array([p.label for p in pats], float)
    half = n // 2
    w = logistic_fit(x[:half], y[:half])
    return auroc(np.c_[np.ones(n - half), x[half:]] @ w, y[half:])


def run(n: int, seed: int, preset: str) -> dict:
    spec = PreprocessSpec()
    rows: list[dict] = []
    t0 = time.perf_counter()
    index = 0
    while len(rows) < n:
        patient, records = patient_images(seed, index, preset)
        index += 1
        for rec in records[: n - len(rows)]:
            ds = build_dataset(rec.image.stored, rec.header, VENDOR_PROFILES[rec.image.profile])
            raw = read_pixels(ds)
            x = preprocess(raw, spec)[0]
            trab = resize_mask(rec.image.mask, spec, TRABECULAR) > 0.7
            cort = resize_mask(rec.image.mask, spec, CORTEX) > 0.7
            hp = x - box_blur(x, 3)  # trabecular texture energy: high-pass residual
            rows.append(
                {
                    "patient": patient.index,
                    "label": patient.label,
                    "who": patient.who,
                    "t": patient.t_score,
                    "age": patient.age,
                    "sex": patient.sex_recorded,
                    "bmi": patient.bmi_recorded,
                    "profile": rec.image.profile,
                    "mean_pre": float(x.mean()),
                    "mean_raw": float(raw.mean()),
                    "trab_mean": float(x[trab].mean()) if trab.any() else np.nan,
                    "trab_sd": float(x[trab].std()) if trab.any() else np.nan,
                    "cort_mean": float(x[cort].mean()) if cort.any() else np.nan,
                    "trab_hp_sd": float(hp[trab].std()) if trab.any() else np.nan,
                }
            )
    elapsed = time.perf_counter() - t0
    y = np.array([r["label"] for r in rows])
    t = np.array([r["t"] for r in rows])
    pat = np.array([r["patient"] for r in rows])
    train = pat % 2 == 0
    xc = _clinical_matrix(rows)
    w = logistic_fit(xc[train], y[train])
    clin = auroc(np.c_[np.ones(len(xc)), xc][~train] @ w, y[~train])

    def sym(a: float) -> float:
        return max(a, 1.0 - a)

    out = {
        "clinical_logistic_auroc_patients": round(_clinical_patients(seed, preset), 3),
        "n_images": len(rows),
        "n_patients": int(index),
        "seconds_incl_decode": round(elapsed, 1),
        "class_mix": np.bincount([r["who"] for r in rows], minlength=3).tolist(),
        "clinical_logistic_auroc_heldout": round(clin, 3),
        "mean_intensity_auroc_pre": round(sym(auroc(np.array([r["mean_pre"] for r in rows]), y)), 3),
        "mean_intensity_auroc_raw": round(sym(auroc(np.array([r["mean_raw"] for r in rows]), y)), 3),
    }
    for key in ("trab_mean", "trab_sd", "trab_hp_sd", "cort_mean", "mean_pre"):
        f = np.array([r[key] for r in rows])
        ok = np.isfinite(f)
        out[f"r_{key}_vs_T"] = round(float(np.corrcoef(f[ok], t[ok])[0, 1]), 3)
        out[f"auroc_{key}"] = round(sym(auroc(f[ok], y[ok])), 3)
    by_profile = {}
    for name in sorted({r["profile"] for r in rows}):
        sel = np.array([r["profile"] == name for r in rows])
        if 0 < y[sel].sum() < sel.sum():
            by_profile[name] = round(sym(auroc(np.array([r["mean_pre"] for r in rows])[sel], y[sel])), 3)
    out["mean_intensity_auroc_by_profile"] = by_profile
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--preset", default="default")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.n, args.seed, args.preset), indent=2))


if __name__ == "__main__":
    main()
