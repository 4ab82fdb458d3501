"""Evaluation metrics in numpy only (no scikit-learn).

AUROC (Mann-Whitney with midranks) and its DeLong interval, ROC and PR curves, average precision
with a bootstrap interval, Wilson intervals, confusion rates, Pearson r with a Fisher-z interval,
MAE and RMSE.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import NormalDist

import numpy as np


def z_value(confidence: float = 0.95, one_sided: bool = False) -> float:
    """Standard normal quantile for a two-sided (or one-sided) confidence level."""
    tail = 1.0 - confidence if one_sided else (1.0 - confidence) / 2.0
    return NormalDist().inv_cdf(1.0 - tail)


def _check_binary(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def _midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[order[i:j]] = 0.5 * (i + j - 1) + 1.0
        i = j
    return ranks


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half). NaN if a class is absent."""
    y, s = _check_binary(y, s)
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0:
        return float("nan")
    r = _midrank(s)
    return float((r[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def delong_ci(
    y: np.ndarray, s: np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """AUROC with its DeLong standard error and interval: ``(auc, lower, upper, se)``."""
    y, s = _check_binary(y, s)
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        a = auroc(y, s)
        return a, float("nan"), float("nan"), float("nan")
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() / m - (m + 1) / 2.0) / n
    v01 = (tz[:m] - tx) / n  # per positive: share of negatives scored lower
    v10 = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives scored higher
    se = float(np.sqrt(np.var(v01, ddof=1) / m + np.var(v10, ddof=1) / n))
    z = z_value(confidence)
    return float(auc), float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se)), se


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points at every distinct score: ``(fpr, tpr, thresholds)``; predict positive if
    ``score >= threshold``. The first point is (0, 0) with threshold +inf."""
    y, s = _check_binary(y, s)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]
    tps = np.cumsum(ys)[distinct]
    fps = (distinct + 1) - tps
    p, n = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr = np.r_[0.0, tps / p]
    fpr = np.r_[0.0, fps / n]
    thr = np.r_[np.inf, ss[distinct]]
    return fpr, tpr, thr


def pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall points at every distinct score: ``(precision, recall, thresholds)``."""
    y, s = _check_binary(y, s)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]
    tps = np.cumsum(ys)[distinct].astype(np.float64)
    predicted = (distinct + 1).astype(np.float64)
    precision = tps / predicted
    recall = tps / max(int(y.sum()), 1)
    return precision, recall, ss[distinct]


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AUPRC as average precision: sum over thresholds of (R_k - R_{k-1}) * P_k."""
    y, s = _check_binary(y, s)
    if y.sum() == 0:
        return float("nan")
    precision, recall, _ = pr_curve(y, s)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def bootstrap_ci(
    fn: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    s: np.ndarray,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(y, s)``, resampling cases with replacement."""
    y, s = np.asarray(y), np.asarray(s)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        vals.append(fn(yb, s[idx]))
    a = (1.0 - confidence) / 2.0
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1.0 - a))


def wilson_interval(
    k: int, n: int, confidence: float = 0.95, one_sided: bool = False
) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (one-sided: the bound on each side)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = z_value(confidence, one_sided)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def binary_rates(y: np.ndarray, pred: np.ndarray, confidence: float = 0.95) -> dict[str, object]:
    """Sensitivity, specificity, PPV and NPV of 0/1 predictions, each with a Wilson interval."""
    y = np.asarray(y).astype(int).ravel()
    pred = np.asarray(pred).astype(int).ravel()
    tp = int(((pred == 1) & (y == 1)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    out: dict[str, object] = {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    for name, k, n in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
    ):
        out[name] = k / n if n else float("nan")
        out[f"{name}_ci"] = list(wilson_interval(k, n, confidence))
    return out


def pearson_r(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Pearson correlation with a Fisher-z interval: ``(r, lower, upper)``."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = len(x)
    if n < 3:
        return float("nan"), float("nan"), float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    r = float((xc * yc).sum() / np.sqrt((xc**2).sum() * (yc**2).sum()))
    if n <= 3 or abs(r) >= 1.0:
        return r, float("nan"), float("nan")
    z = np.arctanh(r)
    half = z_value(confidence) / np.sqrt(n - 3)
    return r, float(np.tanh(z - half)), float(np.tanh(z + half))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(true, float))))


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, float) - np.asarray(true, float)) ** 2)))
