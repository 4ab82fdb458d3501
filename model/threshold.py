"""Sensitivity-constrained operating points, chosen on validation data only.

- ``point``: the threshold that maximises specificity subject to sensitivity >= target.
- ``conservative``: the threshold that maximises specificity subject to the one-sided lower
  Wilson confidence bound on sensitivity being >= target (95 % by default). Served by default,
  because the point estimate meets the constraint only about half the time on new data.

Images are called positive when ``probability >= threshold``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.metrics import wilson_interval


def _operating_table(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """For each distinct score (descending) the counts if it were the threshold."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.nonzero(np.diff(ps))[0], len(ps) - 1]  # last index of each distinct score
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    scores = ps[last]
    lower_next = np.r_[ps[last[1:]], -np.inf]  # next lower distinct score
    return {"score": scores, "next": lower_next, "tp": tp, "fp": fp}


def _pick(
    table: dict[str, np.ndarray], ok: np.ndarray, n_pos: int, n_neg: int
) -> tuple[float, bool, int]:
    """The highest threshold that satisfies ``ok`` (highest threshold = best specificity)."""
    idx = np.nonzero(ok)[0]
    feasible = len(idx) > 0
    i = int(idx[0]) if feasible else len(table["score"]) - 1
    score, nxt = float(table["score"][i]), float(table["next"][i])
    # midway to the next lower score gives the same validation counts and a margin both sides
    thr = score if not np.isfinite(nxt) else 0.5 * (score + nxt)
    if not feasible:
        thr = min(thr, float(table["score"][-1]))
    return thr, feasible, i


def select_thresholds(
    y: np.ndarray,
    p: np.ndarray,
    target_sensitivity: float = 0.86,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Both operating points with their validation sensitivity and specificity.

    Returns ``{"point": {...}, "conservative": {...}, "target_sensitivity", "confidence"}`` where
    each entry has ``threshold``, ``sensitivity``, ``specificity``, ``sensitivity_lower_bound``
    and ``feasible`` (False when no threshold meets the constraint; then every image is called
    positive).
    """
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("threshold selection needs both classes")
    table = _operating_table(y, p)
    sens = table["tp"] / n_pos
    lower = np.array(
        [wilson_interval(int(k), n_pos, confidence, one_sided=True)[0] for k in table["tp"]]
    )
    out: dict[str, Any] = {
        "target_sensitivity": target_sensitivity,
        "confidence": confidence,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }
    for name, ok in (
        ("point", sens >= target_sensitivity),
        ("conservative", lower >= target_sensitivity),
    ):
        thr, feasible, _ = _pick(table, ok, n_pos, n_neg)
        pred = p >= thr
        tp = int((pred & (y == 1)).sum())
        tn = int((~pred & (y == 0)).sum())
        out[name] = {
            "threshold": thr,
            "sensitivity": tp / n_pos,
            "specificity": tn / n_neg,
            "sensitivity_lower_bound": wilson_interval(tp, n_pos, confidence, one_sided=True)[0],
            "feasible": feasible,
        }
    return out
