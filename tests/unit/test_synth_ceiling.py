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
