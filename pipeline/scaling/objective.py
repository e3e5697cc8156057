"""Approach 3's objective (and the data-constrained law's, on D'): the summed Huber loss (delta
HUBER_DELTA) between the log of the predicted and the observed loss, in the log-sum-exp parameterisation
    log L(N, D) = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
with its analytic gradient, vectorised over the runs and over parameter vectors (batch_objective); the grid
of initial values (make_grid, Hoffmann et al.'s by default) and the conversion of theta = (a, b, e, alpha,
beta) to the natural parameters (E, A, B, alpha, beta).
"""

from __future__ import annotations

import itertools

import numpy as np

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}.
DEFAULT_GRID = {
    "a": np.arange(0, 30, 5.0),
    "b": np.arange(0, 30, 5.0),
    "e": np.arange(-1, 1.5, 0.5),
    "alpha": np.arange(0, 2.5, 0.5),
    "beta": np.arange(0, 2.5, 0.5),
}
PARAM_ORDER = ("a", "b", "e", "alpha", "beta")  # the order of theta in the optimiser
# The exponents stay in [0, 5]: a negative exponent would mean more parameters or data hurt.
EXPONENT_BOUNDS = (0.0, 5.0)
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")  # the natural parameters, in the order _natural gives them


def batch_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float = HUBER_DELTA, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of log-loss residuals and its analytic gradient, for S parameter vectors at once.

    theta: (S, 5) rows (a, b, e, alpha, beta); log_n, log_d, log_l: (S, n) or (1, n) (shared by all rows).
    weights, (S, n) or (1, n), multiply each run's term: a bootstrap resample is the shared data weighted by
    how often each run was drawn, which keeps one (1, n) copy of the data however many rows there are.
    Returns (S,) objective values and (S, 5) gradients.
    """
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    residual = top + np.log(total) - log_l
    abs_r = np.abs(residual)
    huber = np.where(abs_r <= delta, 0.5 * residual**2, delta * (abs_r - 0.5 * delta))
    # d Huber / d r = clip(r, -delta, delta); d LSE / d term = softmax weight of the term.
    dh = np.clip(residual, -delta, delta) / total
    if weights is not None:
        huber, dh = huber * weights, dh * weights
    value = huber.sum(axis=1)
    g_n, g_d = dh * w_n, dh * w_d
    grad = np.stack([g_n.sum(axis=1), g_d.sum(axis=1), (dh * w_e).sum(axis=1),
                     -(g_n * log_n).sum(axis=1), -(g_d * log_d).sum(axis=1)], axis=1)
    return value, grad


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta):
    """One parameter vector (scipy's interface)."""
    value, grad = batch_objective(theta[None, :], log_n[None, :], log_d[None, :], log_l[None, :], delta)
    return float(value[0]), grad[0]


def make_grid(grid: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Initial values (G, 5) in PARAM_ORDER: the product of Hoffmann et al.'s values, with any of the five
    axes replaced by the arrays given (a smaller grid for quick fits, a random one for stability checks)."""
    unknown = set(grid or {}) - set(PARAM_ORDER)
    if unknown:
        raise ValueError(f"grid keys {sorted(unknown)} are not parameters: use {', '.join(PARAM_ORDER)}")
    g = {**DEFAULT_GRID, **(grid or {})}
    return np.array(list(itertools.product(*(np.atleast_1d(g[k]) for k in PARAM_ORDER))), dtype=float)


def _natural(theta: np.ndarray) -> list[float]:
    a, b, e, alpha, beta = theta
    return [float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta)]
