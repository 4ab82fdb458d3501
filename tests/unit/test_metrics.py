"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.calibration import apply_temperature, brier, ece, fit_temperature
from model.conformal import TooFewCases, conformal_quantile, interval_coverage, min_cases
from model.metrics import (
    auroc,
    average_precision,
    binary_rates,
    bootstrap_ci,
    delong_ci,
    mae,
    pearson_r,
    rmse,
    roc_curve,
    wilson_interval,
)

Y4 = np.array([0, 0, 1, 1])
S4 = np.array([0.1, 0.4, 0.35, 0.8])


def test_auroc_hand_example_and_ties() -> None:
    assert auroc(Y4, S4) == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert auroc(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.5])) == pytest.approx(0.75)
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_delong_standard_error_by_hand() -> None:
    # positives 0.35, 0.8: share of negatives below = 0.5, 1.0 (var 0.125)
    # negatives 0.1, 0.4: share of positives above = 1.0, 0.5 (var 0.125)
    auc, lo, hi, se = delong_ci(Y4, S4)
    assert auc == pytest.approx(0.75)
    assert se == pytest.approx(math.sqrt(0.125 / 2 + 0.125 / 2))
    assert lo == pytest.approx(max(0.0, 0.75 - 1.959964 * se), abs=1e-5)
    assert hi == pytest.approx(1.0)


def test_delong_matches_auc_on_random_data() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = y + rng.normal(0, 1, 500)
    auc, lo, hi, se = delong_ci(y, s)
    assert auc == pytest.approx(auroc(y, s))
    assert lo < auc < hi and 0.01 < se < 0.05


def test_roc_curve_endpoints() -> None:
    fpr, tpr, thr = roc_curve(Y4, S4)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.isinf(thr[0]) and np.all(np.diff(thr[1:]) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_average_precision_by_hand() -> None:
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(y, s) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0 / 3.0)
    lo, hi = bootstrap_ci(average_precision, y, s, n_boot=200, seed=1)
    assert 0.0 <= lo <= hi <= 1.0


def test_wilson_interval_by_hand() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    lo1, _ = wilson_interval(92, 100, 0.95, one_sided=True)
    assert lo1 == pytest.approx(0.8635, abs=1e-3)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # NaN for n = 0


def test_binary_rates() -> None:
    r = binary_rates(np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 0, 1]))
    assert r["tp"] == 2 and r["fn"] == 1 and r["tn"] == 1 and r["fp"] == 1
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(0.5)
    assert r["ppv"] == pytest.approx(2 / 3)
    assert r["npv"] == pytest.approx(0.5)


def test_pearson_mae_rmse_by_hand() -> None:
    r, lo, hi = pearson_r(np.array([1, 2, 3, 4, 5]), np.array([2, 4, 5, 4, 5]))
    assert r == pytest.approx(6 / math.sqrt(60))
    z = math.atanh(r)
    assert lo == pytest.approx(math.tanh(z - 1.959964 / math.sqrt(2)), abs=1e-5)
    assert hi == pytest.approx(math.tanh(z + 1.959964 / math.sqrt(2)), abs=1e-5)
    assert mae(np.array([1, 2, 3]), np.array([1, 1, 1])) == pytest.approx(1.0)
    assert rmse(np.array([1, 2, 3]), np.array([1, 1, 1])) == pytest.approx(math.sqrt(5 / 3))


def test_ece_brier_by_hand() -> None:
    p, y = np.array([0.1, 0.9]), np.array([0, 1])
    assert ece(p, y, n_bins=10) == pytest.approx(0.1)
    assert brier(p, y) == pytest.approx(0.01)


def test_temperature_recovers_known_scale() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.07)
    p = apply_temperature(3.0 * z, t)
    assert ece(p, y) < ece(apply_temperature(3.0 * z, 1.0), y)


def test_conformal_quantile_by_hand() -> None:
    true = np.zeros(9)
    pred = np.arange(1, 10, dtype=float)  # residuals 1..9
    assert conformal_quantile(pred, true, 0.9) == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(pred, true, 0.5) == 5.0  # ceil(10 * 0.5) = 5th smallest
    with pytest.raises(TooFewCases, match="at least 9 calibration films with a known T-score; there are 8"):
        conformal_quantile(pred[:8], true[:8], 0.9)  # ceil(9 * 0.9) = 9 > 8: no finite half-width
    assert [min_cases(c) for c in (0.5, 0.8, 0.9, 0.95)] == [1, 4, 9, 19]
    cov, width = interval_coverage(pred, true, 5.0)
    assert cov == pytest.approx(5 / 9) and width == 10.0
