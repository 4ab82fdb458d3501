"""Small closed-form and Newton fits shared by the texture stage and evaluation.

Plain numpy, no model code: serving (``model.texture``, ``model.predict``) imports this module,
so it must never import evaluation or training code.
"""

from __future__ import annotations

import numpy as np


def add_intercept(z: np.ndarray) -> np.ndarray:
    """The design matrix: ``z`` with a column of ones appended (the intercept, last)."""
    return np.c_[z, np.ones(len(z))]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method; returns weights with the intercept
    last. Features are used as given (standardise them first)."""
    xa = add_intercept(x)
    w = np.zeros(xa.shape[1])
    pen = l2 * np.eye(xa.shape[1])
    pen[-1, -1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xa @ w, -30, 30)))
        grad = xa.T @ (p - y) + pen @ w
        hess = xa.T @ (xa * (p * (1 - p))[:, None]) + pen + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Ridge regression with an unpenalised intercept (last column of ``x``)."""
    pen = np.full(x.shape[1], float(l2))
    pen[-1] = 0.0
    return np.linalg.solve(x.T @ x + np.diag(pen + 1e-9), x.T @ y)
