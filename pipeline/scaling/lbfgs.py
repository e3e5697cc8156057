"""The minimiser of approach 3's objective (pipeline.scaling.objective).

lbfgs_batch is an L-BFGS in numpy that moves many starts at once (all 4,500 of the default grid, or every
start of every bootstrap replicate), with the exponents held in EXPONENT_BOUNDS; minimise_from_grid runs it
from every grid point and then polishes the best few distinct optima to tight tolerances with scipy's
L-BFGS-B. The objective and its gradient are analytic: start-by-start scipy with numeric gradients takes
minutes.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from pipeline.scaling.objective import EXPONENT_BOUNDS, HUBER_DELTA, _objective, batch_objective


def _rows(data: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return data if data is None or data.shape[0] == 1 else data[idx]


def _free_directions(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Mask of coordinates free to move: an exponent at its bound with the gradient pushing it out is held."""
    free = np.ones_like(x, dtype=bool)
    lo, hi = EXPONENT_BOUNDS
    free[:, 3:] = ~(((x[:, 3:] <= lo) & (g[:, 3:] > 0)) | ((x[:, 3:] >= hi) & (g[:, 3:] < 0)))
    return free


def _two_loop(g, s_hist, y_hist, rho, gamma, newest_first):
    """L-BFGS direction -H g for every row, from the stored (s, y) pairs (rho = 0 marks an unused slot)."""
    q = g.copy()
    alphas = []
    for i in newest_first:
        a_i = rho[i] * np.einsum("sk,sk->s", s_hist[i], q)
        q -= a_i[:, None] * y_hist[i]
        alphas.append(a_i)
    r = gamma[:, None] * q
    for i, a_i in zip(reversed(newest_first), reversed(alphas), strict=True):
        b_i = rho[i] * np.einsum("sk,sk->s", y_hist[i], r)
        r += s_hist[i] * (a_i - b_i)[:, None]
    return -r


def lbfgs_batch(theta0: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                delta: float = HUBER_DELTA, max_iter: int = 400, memory: int = 10,
                gtol: float = 1e-12, ftol: float = 1e-14,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the approach-3 objective from S starts at once: L-BFGS with a projected Armijo backtracking
    line search, exponents held in EXPONENT_BOUNDS. Data arrays (and weights) are (1, n) (shared) or (S, n)
    (one data set per start). A start stops when its projected gradient or its relative decrease is below
    tolerance. Returns (S, 5) optima and (S,) objective values. Starts far from any fit overflow on the way
    (their objective turns inf or nan and they stop or backtrack): numpy's warnings about it are silenced."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _lbfgs_batch(theta0, log_n, log_d, log_l, delta, max_iter, memory, gtol, ftol, weights)


def _lbfgs_batch(theta0, log_n, log_d, log_l, delta, max_iter, memory, gtol, ftol, weights):
    x = np.array(theta0, dtype=float)
    x[:, 3:] = np.clip(x[:, 3:], *EXPONENT_BOUNDS)
    n_starts = len(x)
    f, g = batch_objective(x, log_n, log_d, log_l, delta, weights)
    s_hist, y_hist = np.zeros((memory, n_starts, 5)), np.zeros((memory, n_starts, 5))
    rho, gamma = np.zeros((memory, n_starts)), np.zeros(n_starts)
    active = np.isfinite(f)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xi, gi, fi = x[idx], g[idx], f[idx]
        free = _free_directions(xi, gi)
        gf = np.where(free, gi, 0.0)
        # Without curvature pairs yet, a first step of at most 1 in any coordinate.
        scale = np.where(gamma[idx] > 0, gamma[idx], 1.0 / np.maximum(np.abs(gf).max(axis=1), 1e-300))
        newest_first = [(it - 1 - j) % memory for j in range(min(it, memory))]
        p = np.where(free, _two_loop(gf, s_hist[:, idx], y_hist[:, idx], rho[:, idx], scale, newest_first), 0.0)
        slope = (gf * p).sum(axis=1)
        uphill = ~(slope < 0)  # not a descent direction: fall back to steepest descent
        p[uphill] = -scale[uphill, None] * gf[uphill]
        x_new, f_new, g_new, moved = _armijo_batch(xi, fi, gi, p, (log_n, log_d, log_l, weights), delta, idx)
        s, y = x_new - xi, g_new - gi
        sy = np.einsum("sk,sk->s", s, y)
        good = sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1)
        slot = it % memory
        s_hist[slot, idx], y_hist[slot, idx] = s, y
        rho[slot, idx] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        gamma[idx] = np.where(good, sy / np.maximum(np.einsum("sk,sk->s", y, y), 1e-300), gamma[idx])
        x[idx], f[idx], g[idx] = x_new, f_new, g_new
        projected = np.where(_free_directions(x_new, g_new), g_new, 0.0)
        stalled = fi - f_new <= ftol * np.maximum(np.abs(fi), 1e-30)
        done = (~moved) | (np.abs(projected).max(axis=1) < gtol) | stalled
        active[idx[done]] = False
    return x, f


def _armijo_batch(x, f, g, p, data, delta, idx, c1: float = 1e-4, max_backtracks: int = 50):
    """Backtrack from t = 1 until f(P(x + t p)) <= f(x) + c1 g.(P(x + t p) - x), row by row (P clips the
    exponents to their bounds; each shorter t comes from a quadratic model of f along p). Rows that never
    satisfy it keep x and report moved=False."""
    x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
    moved = np.zeros(len(x), dtype=bool)
    t = np.ones(len(x))
    pending = np.arange(len(x))
    for _ in range(max_backtracks):
        if pending.size == 0:
            break
        trial = x[pending] + t[pending, None] * p[pending]
        trial[:, 3:] = np.clip(trial[:, 3:], *EXPONENT_BOUNDS)
        rows = idx[pending]
        f_try, g_try = batch_objective(trial, *(_rows(a, rows) for a in data[:3]), delta, _rows(data[3], rows))
        decrease = c1 * ((trial - x[pending]) * g[pending]).sum(axis=1)
        ok = np.isfinite(f_try) & (f_try <= f[pending] + decrease) & (f_try <= f[pending])
        accepted = pending[ok]
        x_new[accepted], f_new[accepted], g_new[accepted] = trial[ok], f_try[ok], g_try[ok]
        moved[accepted] = True
        # The minimum of the quadratic through f(x), its slope along p and f(x + t p), kept in [t/10, t/2].
        rejected, tr = pending[~ok], t[pending[~ok]]
        slope = (g[rejected] * p[rejected]).sum(axis=1)
        excess = np.where(np.isfinite(f_try[~ok]), f_try[~ok] - f[rejected] - slope * tr, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_quad = -slope * tr**2 / (2 * excess)
        t[rejected] = np.clip(np.nan_to_num(t_quad, nan=0.1 * tr), 0.1 * tr, 0.5 * tr)
        pending = rejected
    return x_new, f_new, g_new, moved


def _polish(start: np.ndarray, log_n, log_d, log_l, delta) -> tuple[np.ndarray, float]:
    bounds = [(None, None)] * 3 + [EXPONENT_BOUNDS] * 2
    result = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                      bounds=bounds, options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-13})
    return result.x, float(result.fun)


def _distinct_best(theta: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """The k best optima that differ from each other (many starts land in the same basin)."""
    order = np.argsort(np.where(np.isfinite(values), values, np.inf))
    chosen: list[np.ndarray] = []
    for i in order:
        if not np.isfinite(values[i]):
            break
        if all(np.max(np.abs(theta[i] - c)) > 1e-3 for c in chosen):
            chosen.append(theta[i])
        if len(chosen) == k:
            break
    return np.array(chosen)


def minimise_from_grid(log_n, log_d, log_l, grid: np.ndarray, delta: float = HUBER_DELTA,
                       n_polish: int = 8) -> tuple[np.ndarray, float, np.ndarray]:
    """L-BFGS from every grid point (batched), then L-BFGS-B polishes the n_polish best distinct optima;
    returns the best (theta, objective) and those distinct optima as found (the basins the grid reached: where a
    bootstrap replicate of the same runs starts too)."""
    # A loose stopping rule here (relative decrease per step below 1e-7) lets the thousands of starts that
    # crawl along plateaus stop early; the polish below takes the best candidates to tight tolerances.
    theta, values = lbfgs_batch(grid, log_n[None, :], log_d[None, :], log_l[None, :], delta, max_iter=300,
                                ftol=1e-7)
    best, best_value = None, np.inf
    basins = _distinct_best(theta, values, n_polish)
    for start in basins:
        polished, value = _polish(start, log_n, log_d, log_l, delta)
        if value < best_value:
            best, best_value = polished, value
    if best is None:
        raise ValueError("approach 3 found no finite optimum: check that every N, D and loss is positive")
    return best, best_value, basins
