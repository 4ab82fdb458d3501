"""The Bayes ceiling (model/synth/ceiling.py) is a real posterior of the generator: calibrated,
and no worse than a regression fitted to the same observations (which it must beat to be the
best reader)."""

from __future__ import annotations

import numpy as np

from model.synth.ceiling import _GRID, OSTEOPENIA_T, posterior, score, simulate


def test_posterior_probabilities_match_the_simulated_frequencies() -> None:
    knees = simulate(4000, seed=17)
    post = posterior(knees)
    p_loss = post[:, _GRID <= OSTEOPENIA_T].sum(axis=1)
    loss = knees.t <= OSTEOPENIA_T
    for lo, hi in ((0.0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.0)):
        sel = (p_loss >= lo) & (p_loss < hi)
        assert sel.sum() > 200
        assert abs(p_loss[sel].mean() - loss[sel].mean()) < 0.05, (lo, hi)


def test_the_posterior_median_beats_a_fitted_regression_out_of_sample() -> None:
    fit, test = simulate(4000, seed=18), simulate(4000, seed=19)

    def design(k):  # cubic in the cue mean, linear in the clinical part
        return np.c_[np.ones(len(k.t)), k.cue_mean, k.cue_mean**2, k.cue_mean**3, k.t_mean]

    w = np.linalg.lstsq(design(fit), fit.t, rcond=None)[0]
    regression_mae = np.abs(design(test) @ w - test.t).mean()
    bayes = score(test, posterior(test))
    assert bayes["tscore_mae"] <= regression_mae
    assert 0.80 < bayes["severity_auroc"] < 0.95  # the default preset's cues are informative, not perfect


def test_a_written_set_is_scored_film_by_film_from_its_regenerated_knees(tmp_path) -> None:
    import csv

    import pytest

    from model.synth.ceiling import of_manifests
    from model.synth.generate import generate, patient_knees

    manifest = generate(tmp_path / "set", n=10, seed=424242, compressed_fraction=0.0, repeat_fraction=0.5)
    rows = list(csv.DictReader(manifest.open()))
    films = of_manifests([manifest])
    assert len(films.t) == len(rows) == 10
    for row, t, cue in zip(rows, films.t, films.cue_mean, strict=True):
        person, knees = patient_knees(424242, int(row["patient_id"].split("-")[1]))
        assert f"{t:.2f}" == row["t_score"]
        sides = [row["laterality"]] if row["laterality"] in knees else ["L", "R"]
        assert cue == pytest.approx(np.mean([knees[s].cue_mean for s in sides]))
        # the knee shows its patient's cues plus a small per-knee jitter (SD 0.12 per cue)
        assert abs(cue - np.mean(list(person.cues.values()))) < 0.25
    assert len(set(films.patient)) == len({r["patient_id"] for r in rows})
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,laterality\nMRN12345,L\n")
    with pytest.raises(ValueError, match="not one this generator writes"):
        of_manifests([bad])
