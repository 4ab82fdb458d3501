"""The best any reader of the films can do on this generator (the Bayes ceiling).

An image shows a knee's six bone cues (cortex, trabecular fraction, thickness, spacing,
horizontal trabeculae, mineral), each the patient's latent knee BMD plus the cue's own noise
(``PatientModel.cue_noise``) and a per-knee jitter (``Preset.knee_noise``), times
``Preset.cue_gain``. The knee BMD itself follows the DXA T-score only with correlation
``PatientModel.knee_corr`` (site discordance), and the T-score follows age, sex and BMI. A reader
that recovered all six cues exactly, knew the clinical variables, and knew the generator's
equations could do no better than the posterior of the T-score given those; this module computes
that posterior on a grid and scores it like a model:

- T-score: the posterior median (minimises the absolute error), its MAE and Pearson r;
- screening: P(T <= -1.0 | cues, clinical), its AUROC;
- severity: P(T <= -2.5 | T <= -1.0, cues, clinical), its AUROC among true bone-loss knees.

Image noise, pose, processing and clipping of the bone parameters only lose information, so a
model's figures on this generator's test sets are at most these in expectation. The per-knee and
per-image ceilings are the same: every film of a knee shows the same bone. ``spread`` repeats the
scoring on simulated test sets of a given number of patients to show how far one test set of that
size strays from the expected value.

``of_manifests`` scores the perfect reader on a set this generator wrote, film by film (each film
row of its manifest: its patient's truth and the cues of the knee it shows, regenerated from the
seed and patient index in its patient ID; a film of both knees shows the mean of the two), so a
model's figures on that very set can be set beside what any reader could reach there.

Run ``python -m model.synth.ceiling --n 20000 --seed 5 --preset default``, or
``python -m model.synth.ceiling --manifest data/test/manifest.csv`` for a written set.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.synth.patient import (
    _T_AGE_PER_YEAR,
    _T_BMI_PER_UNIT,
    _T_FEMALE,
    _T_INTERCEPT,
    _T_MEAN_CENTRE,
    _T_NOISE_SD,
    _T_SCALE,
    Patient,
    _natural_mix,
    sample_patient,
)
from model.synth.presets import Preset, get_preset
from model.synth.selfcheck import auroc

OSTEOPENIA_T, OSTEOPOROSIS_T = -1.0, -2.5
_GRID = np.linspace(-5.0, 3.0, 801)
N_CUES = 6


@dataclass
class Knees:
    """Simulated knees: truth, clinical variables and the perfect reader's observation."""

    patient: np.ndarray  # patient index of each knee
    t: np.ndarray
    t_mean: np.ndarray  # the clinical part of the T-score model (age, sex, BMI)
    cue_mean: np.ndarray  # mean of the six cue z-scores the film shows (gain removed)


def _clinical_mean(person: Patient) -> float:
    """The clinical part of the generator's T-score model (age, sex, BMI)."""
    female = person.sex == "F"
    bmi = person.bmi - 27.0
    return float(_T_INTERCEPT + _T_AGE_PER_YEAR * (person.age - 50) + _T_FEMALE * female + _T_BMI_PER_UNIT * bmi)


# a manifest reader may prefix the set's name ("set:SYN884211-000007")
_PATIENT_ID = re.compile(r"(?:^|:)SYN(\d+)-(\d+)$")


def of_films(films: Iterable[tuple[str, str]], preset: str | Preset = "default") -> Knees:
    """The perfect reader's observations for films given as (patient ID, laterality), one entry
    per film as a model is scored; ``ValueError`` for a patient ID this generator did not write."""
    from model.synth.generate import patient_knees

    cache: dict[tuple[int, int], tuple[float, float, dict[str, float]]] = {}
    ids: dict[tuple[int, int], int] = {}
    pat, t, t_mean, cue = [], [], [], []
    for patient_id, side in films:
        m = _PATIENT_ID.search(patient_id)
        if not m:
            raise ValueError("a film's patient ID is not one this generator writes")
        key = (int(m.group(1)), int(m.group(2)))
        if key not in cache:
            person, knees = patient_knees(key[0], key[1], preset)
            cache[key] = (person.t_score, _clinical_mean(person), {s: k.cue_mean for s, k in knees.items()})
        truth, mean, cues = cache[key]
        pat.append(ids.setdefault(key, len(ids)))
        t.append(truth)
        t_mean.append(mean)
        cue.append(cues[side] if side in cues else (cues["L"] + cues["R"]) / 2)
    return Knees(np.array(pat), np.array(t), np.array(t_mean), np.array(cue))


def of_manifests(manifests: list[Path], preset: str | Preset = "default") -> Knees:
    """``of_films`` for every row of written sets' manifests."""
    films: list[tuple[str, str]] = []
    for manifest in manifests:
        with Path(manifest).open(newline="", encoding="utf-8") as fh:
            films += [(row["patient_id"], row["laterality"]) for row in csv.DictReader(fh)]
    return of_films(films, preset)


def simulate(n_patients: int, seed: int, preset: str | Preset = "default") -> Knees:
    """Both knees of ``n_patients`` patients drawn with the generator's own patient model."""
    p = get_preset(preset)
    pat, t, t_mean, cue = [], [], [], []
    for i in range(n_patients):
        rng = np.random.default_rng([seed, 31, i])
        person = sample_patient(rng, i, p.patient)
        mean = _clinical_mean(person)
        cues = np.array(list(person.cues.values()))
        for _side in "LR":
            jitter = rng.normal(0.0, p.knee_noise, size=N_CUES)
            pat.append(i)
            t.append(person.t_score)
            t_mean.append(mean)
            cue.append(float((cues + jitter).mean()))
    return Knees(np.array(pat), np.array(t), np.array(t_mean), np.array(cue))


def posterior(knees: Knees, preset: str | Preset = "default") -> np.ndarray:
    """P(T on the grid | cues, clinical) per knee, (n_knees, len(_GRID)), rows summing to 1."""
    p = get_preset(preset)
    natural = np.asarray(_natural_mix())
    target = np.asarray(p.patient.class_mix, float)
    accept = (target / target.sum()) / np.maximum(natural, 1e-9)
    who = np.where(_GRID > OSTEOPENIA_T, 0, np.where(_GRID > OSTEOPOROSIS_T, 1, 2))
    r = float(np.clip(p.patient.knee_corr, 0.0, 1.0))
    obs_var = (1.0 - r * r) + (p.patient.cue_noise**2 + p.knee_noise**2) / N_CUES
    t_z = (_GRID - _T_MEAN_CENTRE) / _T_SCALE
    log_prior = -0.5 * ((_GRID[None, :] - knees.t_mean[:, None]) / _T_NOISE_SD) ** 2 + np.log(accept[who])[None, :]
    log_like = -0.5 * (knees.cue_mean[:, None] - r * t_z[None, :]) ** 2 / obs_var
    logp = log_prior + log_like
    logp -= logp.max(axis=1, keepdims=True)
    w = np.exp(logp)
    return w / w.sum(axis=1, keepdims=True)


def score(knees: Knees, post: np.ndarray) -> dict[str, float]:
    """The Bayes reader's figures on these knees."""
    cdf = np.cumsum(post, axis=1)
    median = _GRID[np.argmax(cdf >= 0.5, axis=1)]
    mean = post @ _GRID
    p_loss = post[:, _GRID <= OSTEOPENIA_T].sum(axis=1)
    p_porosis = post[:, _GRID <= OSTEOPOROSIS_T].sum(axis=1)
    loss = knees.t <= OSTEOPENIA_T
    sev = p_porosis[loss] / np.maximum(p_loss[loss], 1e-12)
    return {
        "tscore_mae": float(np.abs(median - knees.t).mean()),
        "tscore_r": float(np.corrcoef(mean, knees.t)[0, 1]),
        "screening_auroc": auroc(p_loss, loss.astype(int)),
        "severity_auroc": auroc(sev, (knees.t[loss] <= OSTEOPOROSIS_T).astype(int)),
    }


def spread(n_sets: int, n_patients: int, seed: int, preset: str | Preset = "default") -> dict[str, list[float]]:
    """2.5th, 50th and 97.5th percentile of each figure over ``n_sets`` simulated test sets of
    ``n_patients`` patients (both knees each) and the share of sets where it meets the issue's
    goal (severity AUROC >= 0.90, T-score MAE <= 0.50)."""
    rows = []
    for k in range(n_sets):
        knees = simulate(n_patients, seed * 1000 + k, preset)
        rows.append(score(knees, posterior(knees, preset)))
    out: dict[str, list[float]] = {}
    for key in rows[0]:
        v = np.array([r[key] for r in rows])
        out[key] = [round(float(q), 3) for q in np.percentile(v, [2.5, 50, 97.5])]
    out["share_severity_auroc_ge_0.90"] = [round(float(np.mean([r["severity_auroc"] >= 0.90 for r in rows])), 3)]
    out["share_tscore_mae_le_0.50"] = [round(float(np.mean([r["tscore_mae"] <= 0.50 for r in rows])), 3)]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="patients for the expected ceiling")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--sets", type=int, default=200, help="simulated test sets for the spread")
    ap.add_argument("--set-patients", type=int, default=283, help="patients per simulated test set")
    ap.add_argument(
        "--manifest", type=Path, action="append", help="score the perfect reader on this written set (repeatable)"
    )
    args = ap.parse_args(argv)
    if args.manifest:
        films = of_manifests(args.manifest, args.preset)
        figures = {k: round(v, 3) for k, v in score(films, posterior(films, args.preset)).items()}
        print(json.dumps({"preset": args.preset, "films": len(films.t), "perfect_reader": figures}, indent=2))
        return
    knees = simulate(args.n, args.seed, args.preset)
    expected = {k: round(v, 3) for k, v in score(knees, posterior(knees, args.preset)).items()}
    report = {
        "preset": args.preset,
        "knees": len(knees.t),
        "expected": expected,
        f"spread_over_{args.sets}_sets_of_{args.set_patients}_patients": spread(
            args.sets, args.set_patients, args.seed + 1, args.preset
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
