"""Temperature scaling of the screening logit, expected calibration error and Brier score."""

from __future__ import annotations

import numpy as np
import torch


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -50, 50)))


def fit_temperature(logits: np.ndarray, y: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of ``sigmoid(logits / T)`` (LBFGS on log T)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    t = torch.as_tensor(np.asarray(y, dtype=np.float64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    temp = float(log_t.detach().exp())
    if not np.isfinite(temp) or temp <= 0:
        return 1.0
    return float(np.clip(temp, 0.05, 20.0))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logits / T)``."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


def reliability(
    p: np.ndarray, y: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins: ``(mean predicted, observed frequency, count)`` per bin (NaN if empty)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(bins, weights=p, minlength=n_bins) / count
        freq = np.bincount(bins, weights=y, minlength=n_bins) / count
    return conf, freq, count


def ece(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins."""
    conf, freq, count = reliability(p, y, n_bins)
    ok = count > 0
    return float(np.sum(count[ok] * np.abs(conf[ok] - freq[ok])) / count.sum())


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def fit_linear(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Least-squares ``true ~ intercept + slope * pred`` (recalibration of the T-score)."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    ok = np.isfinite(pred) & np.isfinite(true)
    if ok.sum() < 3 or np.var(pred[ok]) == 0:
        return 0.0, 1.0
    slope, intercept = np.polyfit(pred[ok], true[ok], 1)
    return float(intercept), float(slope)


def apply_linear(pred: np.ndarray, params: dict | None) -> np.ndarray:
    """Apply a stored ``{"intercept", "slope"}`` recalibration (identity if None)."""
    pred = np.asarray(pred, dtype=np.float64)
    if not params:
        return pred
    return params["intercept"] + params["slope"] * pred
