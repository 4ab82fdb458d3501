"""Operating-point selection on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import wilson_interval
from model.threshold import select_thresholds


def _known_case() -> tuple[np.ndarray, np.ndarray]:
    pos = 1.0 - 0.005 * np.arange(100)  # 1.000, 0.995, ..., 0.505 (distinct)
    neg = np.r_[
        [0.99, 0.89, 0.79, 0.69],  # 4 negatives above any useful threshold
        [0.5725, 0.5625, 0.5525],  # 3 negatives between the 86th and 92nd positive
        np.linspace(0.0, 0.4, 93),
    ]
    y = np.r_[np.ones(100), np.zeros(100)].astype(int)
    return y, np.r_[pos, neg]


def test_point_threshold_known_answer() -> None:
    y, s = _known_case()
    r = select_thresholds(y, s, 0.86, 0.95)["point"]
    # 86 of 100 positives is the fewest that meets 0.86: the 86th positive scores 0.575, the
    # next lower score is the negative at 0.5725 -> threshold midway
    assert r["threshold"] == pytest.approx((0.575 + 0.5725) / 2)
    assert r["sensitivity"] == pytest.approx(0.86)
    assert r["specificity"] == pytest.approx(0.96)
    assert r["feasible"]


def test_conservative_threshold_known_answer() -> None:
    y, s = _known_case()
    # hand-computed: one-sided 95 % Wilson lower bound is 0.8515 for 91/100, 0.8635 for 92/100
    assert wilson_interval(91, 100, 0.95, one_sided=True)[0] < 0.86
    assert wilson_interval(92, 100, 0.95, one_sided=True)[0] >= 0.86
    r = select_thresholds(y, s, 0.86, 0.95)["conservative"]
    # 92nd positive scores 0.545, the next lower (93rd positive) 0.540
    assert r["threshold"] == pytest.approx((0.545 + 0.540) / 2)
    assert r["sensitivity"] == pytest.approx(0.92)
    assert r["specificity"] == pytest.approx(0.93)
    assert r["sensitivity_lower_bound"] >= 0.86
    assert r["feasible"]


def test_conservative_is_never_above_point() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    s = y * 1.5 + rng.normal(0, 1, 400)
    out = select_thresholds(y, s)
    assert out["conservative"]["threshold"] <= out["point"]["threshold"]
    assert out["conservative"]["sensitivity"] >= out["point"]["sensitivity"] >= 0.86


def test_infeasible_conservative_calls_everything_positive() -> None:
    # 10 positives: even 10/10 has a one-sided lower bound of about 0.79 < 0.86
    y = np.r_[np.ones(10), np.zeros(10)].astype(int)
    s = np.r_[np.linspace(0.6, 1.0, 10), np.linspace(0.0, 0.4, 10)]
    out = select_thresholds(y, s)
    assert out["point"]["feasible"] and out["point"]["specificity"] == 1.0
    c = out["conservative"]
    assert not c["feasible"] and c["sensitivity"] == 1.0 and c["specificity"] == 0.0


def test_ties_and_single_class() -> None:
    y = np.array([1, 1, 0, 0])
    s = np.array([0.5, 0.5, 0.5, 0.5])
    r = select_thresholds(y, s)["point"]
    assert r["sensitivity"] == 1.0 and r["specificity"] == 0.0
    with pytest.raises(ValueError):
        select_thresholds(np.ones(3), np.array([0.1, 0.2, 0.3]))
