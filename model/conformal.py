"""Split conformal prediction intervals for the T-score (absolute-residual score)."""

from __future__ import annotations

import math

import numpy as np


class TooFewCases(ValueError):
    """Fewer calibration cases than the interval's coverage needs: no finite half-width exists."""


def min_cases(coverage: float) -> int:
    """The fewest calibration cases for which the ceil((n + 1) * coverage)-th smallest residual
    exists (9 for 0.90, 19 for 0.95): with fewer the interval would be unbounded."""
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must lie in (0, 1), not {coverage!r}")
    n = 1
    while math.ceil((n + 1) * coverage) > n:
        n += 1
    return n


def conformal_quantile(pred: np.ndarray, true: np.ndarray, coverage: float = 0.90) -> float:
    """The half-width q such that ``[pred - q, pred + q]`` covers with probability >= coverage
    for exchangeable new cases: the ceil((n + 1) * coverage)-th smallest absolute residual.
    Raises :class:`TooFewCases` when there are fewer than :func:`min_cases` cases."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    ok = np.isfinite(pred) & np.isfinite(true)
    resid = np.sort(np.abs(pred[ok] - true[ok]))
    n = len(resid)
    if n == 0:
        raise ValueError("conformal calibration needs at least one case with a known T-score")
    k = math.ceil((n + 1) * coverage)
    if k > n:
        raise TooFewCases(
            f"a {coverage:.0%} T-score interval needs at least {min_cases(coverage)} calibration films "
            f"with a known T-score; there are {n}"
        )
    return float(resid[k - 1])


def interval_coverage(pred: np.ndarray, true: np.ndarray, q: float) -> tuple[float, float]:
    """Empirical coverage of ``pred +- q`` and the interval width ``2 q``."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    ok = np.isfinite(pred) & np.isfinite(true)
    covered = np.abs(pred[ok] - true[ok]) <= q
    return float(covered.mean()) if ok.any() else float("nan"), 2.0 * q
