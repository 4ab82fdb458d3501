"""Split conformal prediction intervals for the T-score (absolute-residual score)."""

from __future__ import annotations

import math

import numpy as np


def conformal_quantile(pred: np.ndarray, true: np.ndarray, coverage: float = 0.90) -> float:
    """The half-width q such that ``[pred - q, pred + q]`` covers with probability >= coverage
    for exchangeable new cases: the ceil((n + 1) * coverage)-th smallest absolute residual."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    ok = np.isfinite(pred) & np.isfinite(true)
    resid = np.sort(np.abs(pred[ok] - true[ok]))
    n = len(resid)
    if n == 0:
        raise ValueError("conformal calibration needs at least one case with a known T-score")
    k = math.ceil((n + 1) * coverage)
    if k > n:
        return float("inf")
    return float(resid[k - 1])


def interval_coverage(pred: np.ndarray, true: np.ndarray, q: float) -> tuple[float, float]:
    """Empirical coverage of ``pred +- q`` and the interval width ``2 q``."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    ok = np.isfinite(pred) & np.isfinite(true)
    covered = np.abs(pred[ok] - true[ok]) <= q
    return float(covered.mean()) if ok.any() else float("nan"), 2.0 * q
