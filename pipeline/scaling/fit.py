"""Scaling-law fits: Chinchilla approaches 2 and 3 (Hoffmann et al. 2022) and Kaplan-style power laws.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta by minimising the Huber loss (delta 1e-3) between
the log of the predicted and the observed loss, in the log-sum-exp parameterisation
    log L(N, D) = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
with L-BFGS from every point of a grid of initial values, as in the paper. The objective and its gradient
are analytic and vectorised over the runs *and* over the starting points: one batched L-BFGS (numpy, below)
moves all 4,500 starts of the default grid at once, and scipy's L-BFGS-B then polishes the best few to tight
tolerances. The bootstrap reuses the batched solver with one resampled data set per problem, so 200
refits cost about as much as one more pass. Start-by-start scipy with numeric gradients takes minutes.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.optimize import minimize

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


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class ScalingPoint:
    """One training run: N parameters, D training tokens, final loss (nats/token); C = 6 N D unless given.

    N is the count the compute formula uses (total parameters); N_nonembedding, when known, is Kaplan's N
    (without embedding tables). budget labels the IsoFLOP budget or grid cell the run belongs to.
    """

    N: float
    D: float
    loss: float
    C: float | None = None
    budget: str | None = None
    N_nonembedding: float | None = None

    def compute(self) -> float:
        """Training FLOPs: the recorded C, or 6 N D."""
        return self.C if self.C else 6.0 * self.N * self.D


CSV_COLUMNS = ["N", "D", "loss", "C", "budget", "N_nonembedding"]


def load_points_csv(path: str | Path) -> list[ScalingPoint]:
    """Runs from a CSV with columns N, D, loss and optionally C, budget, N_nonembedding (empty = unknown)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no runs: it needs a header N,D,loss (optionally C) and one row per run")
    missing = {"N", "D", "loss"} - set(rows[0])
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: it needs N, D, loss (and C)")
    points = []
    for line, r in enumerate(rows, start=2):
        try:
            points.append(ScalingPoint(
                N=float(r["N"]), D=float(r["D"]), loss=float(r["loss"]),
                C=float(r["C"]) if r.get("C") else None,
                budget=r.get("budget") or None,
                N_nonembedding=float(r["N_nonembedding"]) if r.get("N_nonembedding") else None,
            ))
        except ValueError as err:
            raise ValueError(f"{path}, line {line}: {err}; N, D, loss (and C) must be numbers") from err
        if min(points[-1].N, points[-1].D, points[-1].loss) <= 0:
            raise ValueError(f"{path}, line {line}: N, D and loss must be positive, got {r}")
    return points


def write_points_csv(points: list[ScalingPoint], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for p in points:
            # repr of a float round-trips exactly.
            writer.writerow({"N": repr(float(p.N)), "D": repr(float(p.D)), "loss": repr(float(p.loss)),
                             "C": repr(float(p.compute())), "budget": p.budget or "",
                             "N_nonembedding": "" if p.N_nonembedding is None else repr(float(p.N_nonembedding))})


def _log_arrays(points: list[ScalingPoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    log_n = np.log(np.array([p.N for p in points], dtype=float))
    log_d = np.log(np.array([p.D for p in points], dtype=float))
    log_l = np.log(np.array([p.loss for p in points], dtype=float))
    return log_n, log_d, log_l


# ------------------------------------------------------------------------- approach 3: the objective


def batch_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of log-loss residuals and its analytic gradient, for S parameter vectors at once.

    theta: (S, 5) rows (a, b, e, alpha, beta); log_n, log_d, log_l: (S, n) or (1, n) (shared by all rows).
    Returns (S,) objective values and (S, 5) gradients.
    """
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    residual = top + np.log(total) - log_l
    abs_r = np.abs(residual)
    value = np.where(abs_r <= delta, 0.5 * residual**2, delta * (abs_r - 0.5 * delta)).sum(axis=1)
    # d Huber / d r = clip(r, -delta, delta); d LSE / d term = softmax weight of the term.
    dh = np.clip(residual, -delta, delta) / total
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


# ------------------------------------------------------------------ approach 3: the batched optimiser


def _rows(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return data if data.shape[0] == 1 else data[idx]


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
                gtol: float = 1e-12, ftol: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the approach-3 objective from S starts at once: L-BFGS with a projected Armijo backtracking
    line search, exponents held in EXPONENT_BOUNDS. Data arrays are (1, n) (shared) or (S, n) (one data set
    per start, for the bootstrap). A start stops when its projected gradient or its relative decrease is
    below tolerance. Returns (S, 5) optima and (S,) objective values."""
    x = np.array(theta0, dtype=float)
    x[:, 3:] = np.clip(x[:, 3:], *EXPONENT_BOUNDS)
    n_starts = len(x)
    f, g = batch_objective(x, log_n, log_d, log_l, delta)
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
        x_new, f_new, g_new, moved = _armijo_batch(xi, fi, gi, p, log_n, log_d, log_l, delta, idx)
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


def _armijo_batch(x, f, g, p, log_n, log_d, log_l, delta, idx, c1: float = 1e-4, max_backtracks: int = 50):
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
        f_try, g_try = batch_objective(trial, _rows(log_n, rows), _rows(log_d, rows), _rows(log_l, rows), delta)
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
                       n_polish: int = 8) -> tuple[np.ndarray, float]:
    """L-BFGS from every grid point (batched), then L-BFGS-B polishes the n_polish best distinct optima;
    returns the best (theta, objective)."""
    # A loose stopping rule here (relative decrease per step below 1e-7) lets the thousands of starts that
    # crawl along plateaus stop early; the polish below takes the best candidates to tight tolerances.
    theta, values = lbfgs_batch(grid, log_n[None, :], log_d[None, :], log_l[None, :], delta, max_iter=300,
                                ftol=1e-7)
    best, best_value = None, np.inf
    for start in _distinct_best(theta, values, n_polish):
        polished, value = _polish(start, log_n, log_d, log_l, delta)
        if value < best_value:
            best, best_value = polished, value
    if best is None:
        raise ValueError("approach 3 found no finite optimum: check that every N, D and loss is positive")
    return best, best_value


# --------------------------------------------------------------------------- approach 3: the result


PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap percentile intervals (confidence level)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # the minimised summed Huber loss
    n_points: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    confidence: float = 0.95
    bootstrap_params: list[list[float]] = field(default_factory=list, repr=False)  # rows (E, A, B, alpha, beta)

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, C: float) -> tuple[float, float, float]:
        """(N_opt, D_opt, predicted loss) minimising L under C = 6 N D."""
        # In logs: a degenerate bootstrap replicate (A or B near 0, tiny exponents) gives G = 0 or inf in
        # floating point, and its allocation should come out as 0/inf (and land in the interval's tails), not
        # raise in the middle of a report.
        with np.errstate(all="ignore"):
            log_g = (np.log(self.alpha * self.A) - np.log(self.beta * self.B)) / (self.alpha + self.beta)
            log_c = np.log(C / 6.0)
            n_opt = np.exp(log_g + self.a * log_c)
            d_opt = np.exp(self.b * log_c - log_g)
            loss = self.loss(n_opt, d_opt)
        return float(n_opt), float(d_opt), float(loss)

    def bootstrap_fits(self) -> list[ChinchillaFit]:
        return [ChinchillaFit(*row, objective=float("nan"), n_points=self.n_points) for row in self.bootstrap_params]

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "bootstrap_params"}
        out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        out.update(a=self.a, b=self.b, G=self.G)
        return out


def _natural(theta: np.ndarray) -> list[float]:
    a, b, e, alpha, beta = theta
    return [float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta)]


def _percentile_interval(values, confidence: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)


def fit_chinchilla(
    points: list[ScalingPoint],
    *,
    grid: dict[str, np.ndarray] | None = None,
    n_polish: int = 8,
    delta: float = HUBER_DELTA,
    n_bootstrap: int = 200,
    bootstrap_grid_starts: int = 3,
    confidence: float = 0.95,
    seed: int = 0,
) -> ChinchillaFit:
    """Approach 3: L-BFGS from every grid point (see make_grid), then bootstrap percentile intervals.

    Each bootstrap replicate resamples the runs with replacement and is refitted from the full-data optimum
    plus the bootstrap_grid_starts best grid points; intervals cover E, A, B, alpha, beta, a, b and G.
    n_bootstrap=0 skips the bootstrap.
    """
    if len(points) < 5:
        raise ValueError(f"approach 3 fits 5 parameters: it needs at least 5 runs, got {len(points)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95")
    log_n, log_d, log_l = _log_arrays(points)
    if not np.all(np.isfinite([log_n, log_d, log_l])):
        raise ValueError("approach 3 needs positive, finite N, D and loss for every run")
    grid_points = make_grid(grid)
    theta, value = minimise_from_grid(log_n, log_d, log_l, grid_points, delta, n_polish)
    E, A, B, alpha, beta = _natural(theta)
    fit = ChinchillaFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=value, n_points=len(points),
                        confidence=confidence)
    if n_bootstrap <= 0:
        return fit
    samples = _bootstrap(theta, grid_points, log_n, log_d, log_l, delta, n_bootstrap, bootstrap_grid_starts, seed)
    fit.bootstrap_params = samples.tolist()
    for i, name in enumerate(PARAM_NAMES):
        fit.intervals[name] = _percentile_interval(samples[:, i], confidence)
    boots = fit.bootstrap_fits()
    for name in ("a", "b", "G"):
        fit.intervals[name] = _percentile_interval([getattr(b, name) for b in boots], confidence)
    return fit


def _bootstrap(theta, grid_points, log_n, log_d, log_l, delta, n_bootstrap, grid_starts, seed) -> np.ndarray:
    """(n_bootstrap, 5) natural parameters, one row per resample, all refits in one batched L-BFGS."""
    rng = np.random.default_rng(seed)
    n = len(log_n)
    resamples = rng.integers(0, n, size=(n_bootstrap, n))
    full_values, _ = batch_objective(grid_points, log_n[None, :], log_d[None, :], log_l[None, :], delta)
    starts = np.vstack([theta, grid_points[np.argsort(full_values)[:grid_starts]]])
    k = len(starts)
    idx = np.repeat(resamples, k, axis=0)  # problem j = (replicate j // k, start j % k)
    thetas, values = lbfgs_batch(np.tile(starts, (n_bootstrap, 1)), log_n[idx], log_d[idx], log_l[idx], delta)
    values = np.where(np.isfinite(values), values, np.inf).reshape(n_bootstrap, k)
    best = thetas.reshape(n_bootstrap, k, 5)[np.arange(n_bootstrap), values.argmin(axis=1)]
    return np.array([_natural(t) for t in best])


def compute_optimal_interval(fit: ChinchillaFit, C: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of N_opt, D_opt and the predicted loss at C over the bootstrap fits ({} if none)."""
    if not fit.bootstrap_params:
        return {}
    arr = np.array([boot.compute_optimal(C) for boot in fit.bootstrap_fits()])
    return {name: _percentile_interval(arr[:, i], fit.confidence)
            for i, name in enumerate(["N_opt", "D_opt", "loss"])}


def compute_optimal_allocation(fit: ChinchillaFit, C: float) -> dict:
    """The compute-optimal model at C FLOPs under C = 6 N D: N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, the
    predicted loss there, and bootstrap intervals of all three ({} when the fit has no bootstrap)."""
    n_opt, d_opt, loss = fit.compute_optimal(C)
    return {"C": float(C), "N_opt": n_opt, "D_opt": d_opt, "loss": loss, "tokens_per_param": d_opt / n_opt,
            "intervals": {k: list(v) for k, v in compute_optimal_interval(fit, C).items()}}


# ------------------------------------------------------------------------------------- power laws


@dataclass
class PowerLaw:
    """y = coefficient * x^exponent, fitted by least squares in log-log space. exponent_interval is the
    t-interval of the slope at the fit's confidence level (None with only 2 points: no residual to judge)."""

    exponent: float
    coefficient: float
    exponent_interval: tuple[float, float] | None
    n_points: int
    confidence: float = 0.95
    # For intervals of predictions: residual standard deviation, mean and spread of log x.
    residual_std: float = 0.0
    log_x_mean: float = 0.0
    log_x_sxx: float = 0.0

    def __call__(self, x):
        return self.coefficient * np.power(x, self.exponent)

    def prediction_interval(self, x: float) -> tuple[float, float] | None:
        """Confidence interval of the fitted line (the mean of log y) at x, back in y units."""
        if self.n_points <= 2 or self.log_x_sxx <= 0:
            return None
        t = stats.t.ppf((1 + self.confidence) / 2, self.n_points - 2)
        se = self.residual_std * np.sqrt(1 / self.n_points + (np.log(x) - self.log_x_mean) ** 2 / self.log_x_sxx)
        centre = np.log(self(x))
        return float(np.exp(centre - t * se)), float(np.exp(centre + t * se))


def fit_power_law(x, y, confidence: float = 0.95) -> PowerLaw:
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError(f"a power law needs at least 2 distinct x values, got {len(set(lx.tolist()))}")
    res = stats.linregress(lx, ly)
    interval, resid_std = None, 0.0
    if len(lx) > 2:
        t = stats.t.ppf((1 + confidence) / 2, len(lx) - 2)
        interval = (float(res.slope - t * res.stderr), float(res.slope + t * res.stderr))
        resid = ly - (res.intercept + res.slope * lx)
        resid_std = float(np.sqrt((resid**2).sum() / (len(lx) - 2)))
    return PowerLaw(float(res.slope), float(np.exp(res.intercept)), interval, len(lx), confidence, resid_std,
                    float(lx.mean()), float(((lx - lx.mean()) ** 2).sum()))


# ------------------------------------------------------------------------------------- approach 2


def group_by_budget(points: list[ScalingPoint], rel_tol: float = 0.05) -> dict[float, list[ScalingPoint]]:
    """Points grouped by compute: runs whose C lies within rel_tol of a group's first C join it. The key is
    the group's geometric-mean compute."""
    groups: list[list[ScalingPoint]] = []
    for p in sorted(points, key=lambda q: q.compute()):
        if groups and abs(p.compute() - groups[-1][0].compute()) <= rel_tol * groups[-1][0].compute():
            groups[-1].append(p)
        else:
            groups.append([p])
    return {float(np.exp(np.mean(np.log([p.compute() for p in g])))): g for g in groups}


@dataclass
class IsoFLOPMinima:
    """Per budget: the parabola in ln N through its losses and, when it lies inside the sizes trained, its minimum."""

    budgets: list[float]
    parabolas: list[list[float]]  # (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 with x = ln N
    n_opt: list[float | None]
    loss_opt: list[float | None]


def isoflop_minima(points: list[ScalingPoint], rel_tol: float = 0.05) -> IsoFLOPMinima:
    """Approach 2's first step: for every budget with 3+ model sizes, loss = parabola(ln N); its vertex is
    N_opt(C) when the parabola opens upwards and the vertex lies within the sizes trained (else None: the
    sizes miss the optimum and extrapolating a parabola is not trustworthy)."""
    out = IsoFLOPMinima([], [], [], [])
    for C, group in group_by_budget(points, rel_tol).items():
        if len({p.N for p in group}) < 3:
            continue
        x = np.log([p.N for p in group])
        coeffs = np.polyfit(x, [p.loss for p in group], 2)
        x_min = -coeffs[1] / (2 * coeffs[0]) if coeffs[0] > 0 else None
        inside = x_min is not None and x.min() <= x_min <= x.max()
        out.budgets.append(float(C))
        out.parabolas.append([float(c) for c in coeffs])
        out.n_opt.append(float(np.exp(x_min)) if inside else None)
        out.loss_opt.append(float(np.polyval(coeffs, x_min)) if inside else None)
    return out


@dataclass
class IsoFLOPFit:
    """Approach 2: per budget the parabola minimum in ln N; then N_opt ∝ C^a and D_opt ∝ C^b."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]
    parabolas: list[list[float]]  # (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 with x = ln N
    n_law: PowerLaw
    d_law: PowerLaw

    @property
    def a(self) -> float:
        return self.n_law.exponent

    @property
    def b(self) -> float:
        return self.d_law.exponent

    def compute_optimal(self, C: float) -> dict:
        """N_opt and D_opt at C from the two power laws, with the regression's intervals (None if < 3 budgets)."""
        return {"C": float(C), "N_opt": float(self.n_law(C)), "D_opt": float(self.d_law(C)),
                "intervals": {"N_opt": self.n_law.prediction_interval(C), "D_opt": self.d_law.prediction_interval(C)}}


def fit_isoflop(points: list[ScalingPoint], confidence: float = 0.95) -> IsoFLOPFit:
    minima = isoflop_minima(points)
    rows = [(C, n, loss, c) for C, n, loss, c in zip(minima.budgets, minima.n_opt, minima.loss_opt, minima.parabolas,
                                                     strict=True) if n is not None]
    if len(rows) < 2:
        raise ValueError(
            "approach 2 needs at least 2 IsoFLOP budgets with 3+ model sizes whose parabola has its minimum "
            f"inside the sizes trained (found {len(rows)}): widen or shift the range of sizes per budget"
        )
    budgets = [r[0] for r in rows]
    n_opt = [r[1] for r in rows]
    d_opt = [C / (6 * n) for C, n in zip(budgets, n_opt, strict=True)]
    return IsoFLOPFit(budgets, n_opt, d_opt, [r[2] for r in rows], [r[3] for r in rows],
                      fit_power_law(budgets, n_opt, confidence), fit_power_law(budgets, d_opt, confidence))


# ----------------------------------------------------------------------------------------- Kaplan


@dataclass
class KaplanFit:
    """L(N) = (N_c / N)^alpha_N and L(C) = (C_c / C)^alpha_C (Kaplan et al. 2020), pure power laws without
    an irreducible term: they describe the range fitted, not the limit."""

    alpha_N: float
    N_c: float
    alpha_N_interval: tuple[float, float] | None
    alpha_C: float
    C_c: float
    alpha_C_interval: tuple[float, float] | None
    n_basis: str  # which N the L(N) law uses: "N" or "N_nonembedding"
    n_law_points: int
    c_law_points: int


def compute_frontier(points: list[ScalingPoint]) -> list[ScalingPoint]:
    """The compute frontier: walking up in compute, every run whose loss beats all cheaper runs."""
    frontier, best = [], np.inf
    for p in sorted(points, key=lambda q: (q.compute(), q.loss)):
        if p.loss < best:
            best = p.loss
            frontier.append(p)
    return frontier


def _kaplan_exponent(law: PowerLaw) -> tuple[float, float, tuple[float, float] | None]:
    # L = (X_c / X)^alpha  <=>  log L = alpha log X_c - alpha log X: exponent = -alpha, k = X_c^alpha.
    alpha = -law.exponent
    x_c = float(law.coefficient ** (1 / alpha)) if alpha > 0 else float("inf")
    interval = (-law.exponent_interval[1], -law.exponent_interval[0]) if law.exponent_interval else None
    return alpha, x_c, interval


def fit_kaplan(points: list[ScalingPoint], confidence: float = 0.95) -> KaplanFit:
    """Kaplan-style laws. L(N) is fitted on the lowest loss each model size reached over all its runs, the
    stand-in for Kaplan's "trained to convergence on enough data" (for an N x D grid that is the largest D;
    for IsoFLOP data, the largest budget the size was trained at). N is the non-embedding count, as in Kaplan
    et al., when every run records it, else the total. L(C) is fitted on the compute frontier
    (compute_frontier), with C = 6 N D from the runs."""
    use_nonembedding = all(p.N_nonembedding for p in points)
    best: dict[float, float] = {}
    for p in points:
        n = p.N_nonembedding if use_nonembedding else p.N
        best[n] = min(best.get(n, np.inf), p.loss)
    ns = sorted(best)
    if len(ns) < 2:
        raise ValueError(f"the Kaplan L(N) law needs runs of at least 2 model sizes, got {len(ns)}")
    alpha_n, n_c, n_interval = _kaplan_exponent(fit_power_law(ns, [best[n] for n in ns], confidence))
    frontier = compute_frontier(points)
    if len({p.compute() for p in frontier}) < 2:
        raise ValueError("the Kaplan L(C) law needs a compute frontier of at least 2 runs: the cheapest run "
                         "has the lowest loss; train larger budgets")
    alpha_c, c_c, c_interval = _kaplan_exponent(
        fit_power_law([p.compute() for p in frontier], [p.loss for p in frontier], confidence))
    return KaplanFit(alpha_N=alpha_n, N_c=n_c, alpha_N_interval=n_interval, alpha_C=alpha_c, C_c=c_c,
                     alpha_C_interval=c_interval, n_basis="N_nonembedding" if use_nonembedding else "N",
                     n_law_points=len(ns), c_law_points=len(frontier))
