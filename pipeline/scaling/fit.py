"""Scaling-law fits: Chinchilla approaches 1, 2 and 3 (Hoffmann et al. 2022), the data-constrained law
(Muennighoff et al. 2023) and Kaplan-style power laws.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta by minimising the Huber loss (delta 1e-3) between
the log of the predicted and the observed loss, in the log-sum-exp parameterisation
    log L(N, D) = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
with L-BFGS from every point of a grid of initial values, as in the paper. The objective and its gradient
are analytic and vectorised over the runs *and* over the starting points: one batched L-BFGS (numpy, below)
moves all 4,500 starts of the default grid at once, and scipy's L-BFGS-B then polishes the best few to tight
tolerances. Start-by-start scipy with numeric gradients takes minutes.

The bootstrap (approaches 2 and 3) resamples whole compute budgets and then runs within them (resample_runs).
Approach 3's replicates are the shared data weighted by how often each run was drawn, refitted by the same
batched L-BFGS from BOOTSTRAP_STARTS starts drawn from the whole grid per replicate (so a replicate can land
in another basin than the full-data fit), in memory-bounded chunks: about 65 ms per replicate for 15 runs.
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
# Grid starts per bootstrap replicate, drawn afresh from the whole grid for each one. Every one of the 4,500
# per replicate would cost 200 full-grid passes (about 200 s for 200 replicates of 15 runs on 2 cores).
BOOTSTRAP_STARTS = 300


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class ScalingPoint:
    """One training run: N parameters, D training tokens, final loss (nats/token); C = 6 N D unless given.

    N is the count the compute formula uses (total parameters); N_nonembedding, when known, is Kaplan's N
    (without embedding tables). budget labels the IsoFLOP budget or grid cell the run belongs to. epochs,
    when known, is the number of passes over the unique training tokens (D / U_D): above 1 the run repeated
    data, and the data-constrained fit (fit_data_constrained) discounts the repeats.
    """

    N: float
    D: float
    loss: float
    C: float | None = None
    budget: str | None = None
    N_nonembedding: float | None = None
    epochs: float | None = None

    def compute(self) -> float:
        """Training FLOPs: the recorded C, or 6 N D."""
        return self.C if self.C else 6.0 * self.N * self.D


CSV_COLUMNS = ["N", "D", "loss", "C", "budget", "N_nonembedding", "epochs"]


def load_points_csv(path: str | Path) -> list[ScalingPoint]:
    """Runs from a CSV with columns N, D, loss and optionally C, budget, N_nonembedding, epochs (empty or
    missing = unknown: CSVs written before a column existed still load)."""
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
                epochs=float(r["epochs"]) if r.get("epochs") else None,
            ))
        except ValueError as err:
            raise ValueError(f"{path}, line {line}: {err}; N, D, loss (and C, epochs) must be numbers") from err
        if min(points[-1].N, points[-1].D, points[-1].loss) <= 0:
            raise ValueError(f"{path}, line {line}: N, D and loss must be positive, got {r}")
        if points[-1].epochs is not None and points[-1].epochs <= 0:
            raise ValueError(f"{path}, line {line}: epochs (passes over the unique tokens) must be positive, got {r}")
    return points


def write_points_csv(points: list[ScalingPoint], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for p in points:
            # repr of a float round-trips exactly.
            writer.writerow({"N": repr(float(p.N)), "D": repr(float(p.D)), "loss": repr(float(p.loss)),
                             "C": repr(float(p.compute())), "budget": p.budget or "",
                             "N_nonembedding": "" if p.N_nonembedding is None else repr(float(p.N_nonembedding)),
                             "epochs": "" if p.epochs is None else repr(float(p.epochs))})


def _log_arrays(points: list[ScalingPoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    log_n = np.log(np.array([p.N for p in points], dtype=float))
    log_d = np.log(np.array([p.D for p in points], dtype=float))
    log_l = np.log(np.array([p.loss for p in points], dtype=float))
    return log_n, log_d, log_l


# ------------------------------------------------------------------------------ bootstrap resampling

RESAMPLE_MODES = ("budget+run", "run")


def budget_groups(points: list[ScalingPoint], rel_tol: float = 0.05) -> list[np.ndarray]:
    """Indices of the runs in each compute budget, cheapest budget first: walking up in compute, a run whose
    C lies within rel_tol of its group's first C joins that group (group_by_budget's grouping)."""
    computes = [p.compute() for p in points]
    groups: list[list[int]] = []
    for i in np.argsort(computes, kind="stable"):
        if groups and abs(computes[i] - computes[groups[-1][0]]) <= rel_tol * computes[groups[-1][0]]:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


@dataclass
class Resamples:
    """Bootstrap resamples: replicate r is a list of index arrays into the runs, one per drawn budget
    (by "budget+run": a budget drawn twice appears twice) or a single array of all runs drawn (by "run").
    note says why by-budget resampling was asked for but not possible."""

    replicates: list[list[np.ndarray]]
    by: str
    note: str | None = None

    def weights(self, n_points: int) -> np.ndarray:
        """(R, n_points): how often each run is drawn in each replicate."""
        return np.array([np.bincount(np.concatenate(groups), minlength=n_points) for groups in self.replicates],
                        dtype=float).reshape(len(self.replicates), n_points)


def _why_not_by_budget(groups: list[np.ndarray], n_points: int) -> str | None:
    if len(groups) < 2:
        return "one compute budget only: resampled by run"
    if sum(len(g) for g in groups if len(g) > 1) < 0.75 * n_points:
        return "the runs do not share compute budgets (an N x D grid, not IsoFLOP budgets): resampled by run"
    return None


def resample_runs(points: list[ScalingPoint], n_replicates: int, seed: int = 0, by: str = "budget+run",
                  rel_tol: float = 0.05) -> Resamples:
    """Bootstrap resamples of the runs (seeded). by="run" draws n runs with replacement. by="budget+run" is a
    cluster bootstrap: draw the budgets (budget_groups) with replacement, then within each drawn budget its
    runs with replacement. Runs of one budget share its compute, so their errors are not independent and
    how the budgets were chosen is itself a source of variance; resampling runs alone hides both and gives
    intervals that are too narrow. With one budget, or runs that do not form budgets (an N x D grid), there
    is nothing to cluster: it falls back to by run and says so in note."""
    if by not in RESAMPLE_MODES:
        raise ValueError(f"resample={by!r}: use one of {', '.join(RESAMPLE_MODES)}")
    rng = np.random.default_rng(seed)
    n = len(points)
    groups = budget_groups(points, rel_tol)
    note = _why_not_by_budget(groups, n) if by == "budget+run" else None
    if by == "run" or note:
        return Resamples([[rng.integers(0, n, n)] for _ in range(n_replicates)], "run", note)
    replicates = []
    for _ in range(n_replicates):
        drawn = rng.integers(0, len(groups), len(groups))
        replicates.append([groups[g][rng.integers(0, len(groups[g]), len(groups[g]))] for g in drawn])
    return Resamples(replicates, "budget+run")


# ------------------------------------------------------------------------- approach 3: the objective


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


# ------------------------------------------------------------------ approach 3: the batched optimiser


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
    bootstrap_info: dict = field(default_factory=dict, repr=False)  # how it resampled, replicates fitted/skipped

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
        out = {k: v for k, v in asdict(self).items() if k not in ("bootstrap_params", "bootstrap_info")}
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
    bootstrap_starts: int | None = BOOTSTRAP_STARTS,
    resample: str = "budget+run",
    confidence: float = 0.95,
    seed: int = 0,
) -> ChinchillaFit:
    """Approach 3: L-BFGS from every grid point (see make_grid), then bootstrap percentile intervals.

    The bootstrap refits resamples of the runs (resample_runs: by budget, then by run within each budget,
    unless resample="run") from bootstrap_starts points drawn from the whole grid per replicate (None: every
    grid point); intervals cover E, A, B, alpha, beta, a, b and G. A replicate that cannot identify the law
    (_identifiable) is skipped and counted in bootstrap_info. n_bootstrap=0 skips the bootstrap.
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
    resamples = resample_runs(points, n_bootstrap, seed, resample)
    weights = resamples.weights(len(points))
    usable = _identifiable(weights, budget_groups(points))
    starts = _replicate_starts(theta, grid_points, int(usable.sum()), bootstrap_starts, seed)
    samples = _bootstrap(starts, log_n, log_d, log_l, weights[usable], delta)
    fit.bootstrap_params = samples.tolist()
    fit.bootstrap_info = {"resample": resamples.by, "resample_note": resamples.note, "fitted": len(samples),
                          "skipped": int((~usable).sum()), "starts_per_replicate": starts.shape[1]}
    if not len(samples):
        return fit
    for i, name in enumerate(PARAM_NAMES):
        fit.intervals[name] = _percentile_interval(samples[:, i], confidence)
    boots = fit.bootstrap_fits()
    for name in ("a", "b", "G"):
        fit.intervals[name] = _percentile_interval([getattr(b, name) for b in boots], confidence)
    return fit


def _identifiable(weights: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """(R,) mask of resamples that can fit 5 parameters: at least 5 distinct runs, from at least 2 compute
    budgets (within one budget ln D = ln C - ln 6 - ln N, so N and D are collinear and the law is not
    identified; with 3 budgets, 1 replicate in 9 draws the same budget three times)."""
    drawn = weights > 0
    n_budgets = np.stack([drawn[:, g].any(axis=1) for g in groups], axis=1).sum(axis=1)
    return (drawn.sum(axis=1) >= 5) & (n_budgets >= 2)


def _replicate_starts(theta: np.ndarray, grid_points: np.ndarray, n_replicates: int, n_starts: int | None,
                      seed: int) -> np.ndarray:
    """(R, k + 1, 5) starts per replicate: the full-data optimum and k grid points drawn without replacement
    from the whole grid, a different draw per replicate (every grid point when n_starts is None or covers
    the grid). The full-data optimum only adds a candidate: each replicate keeps its lowest objective, so it
    cannot pull a replicate into its basin when the grid finds a better one."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the resamples do not shift with n_starts
    k = len(grid_points) if n_starts is None else min(n_starts, len(grid_points))
    picks = [np.arange(len(grid_points)) if k == len(grid_points) else rng.choice(len(grid_points), k, replace=False)
             for _ in range(n_replicates)]
    return np.stack([np.vstack([theta, grid_points[idx]]) for idx in picks]).reshape(n_replicates, k + 1, 5)


def _bytes_per_problem(n_points: int) -> int:
    """Peak bytes one start of lbfgs_batch takes with shared data and (S, n) weights, the weights row
    included. tracemalloc measured about 8 (15 n + 200) bytes (n = 15, 30, 300 runs: the objective's and
    line search's (S, n) temporaries, the curvature history); this allows 8 (21 n + 250).
    tests/pipeline/scaling/test_fit_bootstrap.py checks the bound."""
    return 8 * (21 * n_points + 250)


def _bootstrap(starts: np.ndarray, log_n, log_d, log_l, weights: np.ndarray, delta: float,
               memory_bytes: float = 1e9) -> np.ndarray:
    """(R, 5) natural parameters, one row per weighted resample. Replicates go through the batched L-BFGS in
    chunks sized to keep the problems of a chunk under memory_bytes, with minimise_from_grid's loose first-pass
    stopping rule; each replicate's best start is then taken to tight tolerances in one batched pass."""
    n_rep, k = starts.shape[:2]
    if n_rep == 0:
        return np.zeros((0, 5))
    per_chunk = max(1, int(memory_bytes // (k * _bytes_per_problem(len(log_n)))))
    shared = (log_n[None, :], log_d[None, :], log_l[None, :])
    best = np.empty((n_rep, 5))
    for lo in range(0, n_rep, per_chunk):
        hi = min(lo + per_chunk, n_rep)
        thetas, values = lbfgs_batch(starts[lo:hi].reshape(-1, 5), *shared, delta, max_iter=300, ftol=1e-7,
                                     weights=np.repeat(weights[lo:hi], k, axis=0))
        values = np.where(np.isfinite(values), values, np.inf).reshape(hi - lo, k)
        best[lo:hi] = thetas.reshape(hi - lo, k, 5)[np.arange(hi - lo), values.argmin(axis=1)]
    polished, _ = lbfgs_batch(best, *shared, delta, weights=weights)
    return np.array([_natural(t) for t in polished])


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


# ------------------------------------------------------------------ data-constrained (repeated data)

# R*_D values the profile starts from: 0.1 (a repeated epoch is worth almost nothing) to 1e4 (as good as
# fresh data over any realistic number of epochs). Muennighoff et al. fitted R*_D = 15.4.
R_STAR_GRID = np.logspace(-1, 4, 21)


def effective_data(D, epochs, r_star: float) -> np.ndarray:
    """Muennighoff et al.'s effective data D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)) with U_D = D / epochs
    unique tokens and R_D = epochs - 1 repeats: each further epoch is worth less, and D' saturates at
    U_D (1 + R*_D). Runs with epochs <= 1 or unknown (NaN) see only fresh tokens: D' = D."""
    D = np.asarray(D, float)
    epochs = np.nan_to_num(np.asarray(epochs, float), nan=1.0)
    repeated = epochs > 1
    unique = np.where(repeated, D / np.where(repeated, epochs, 1.0), D)
    return unique * (1.0 - r_star * np.expm1(-np.where(repeated, epochs - 1.0, 0.0) / r_star))


@dataclass
class DataConstrainedFit:
    """L = E + A / N^alpha + B / D'^beta with D' = effective_data(D, epochs, R_star_D). R_star_D_at_bound:
    the best R*_D is at an end of R_STAR_GRID, so the data only bound it (more epochs would tell)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    R_star_D: float
    objective: float
    n_points: int
    n_repeated: int  # runs with epochs > 1
    R_star_D_at_bound: bool = False

    def loss(self, N, D, epochs=1.0):
        d_eff = effective_data(D, epochs, self.R_star_D)
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(d_eff, self.beta)


def fit_data_constrained(points: list[ScalingPoint], *, grid: dict[str, np.ndarray] | None = None,
                         delta: float = HUBER_DELTA, r_star_values=R_STAR_GRID,
                         n_starts: int = 32) -> DataConstrainedFit:
    """The data-constrained law of Muennighoff et al. 2023 for runs that repeat data (ScalingPoint.epochs).

    R*_D enters only through D', so for a fixed R*_D this is exactly approach 3 on (N, D'). The fit is a
    profile over ln R*_D: approach 3's batched L-BFGS at every value of r_star_values (from the n_starts grid
    points best at that value; all values in one batch), then at 41 values between the best one's neighbours
    (warm-started from its optimum, one batch), then approach 3's full multi-start fit at the R*_D found.
    A 6-parameter optimiser would be free to trade R*_D against B and beta where few epochs pin it down; the
    profile makes that visible (R_star_D_at_bound) instead. The paper's R*_N (excess parameters decay like
    excess epochs) is not fitted, N' = N: our sweeps do not train models far past their data-optimal size,
    so the data would not constrain it.
    """
    epochs = np.array([np.nan if p.epochs is None else p.epochs for p in points], dtype=float)
    n_repeated = int(np.sum(epochs > 1))
    if n_repeated == 0:
        raise ValueError("no run repeats data (every epochs is <= 1 or unknown)")
    if len(points) < 6:
        raise ValueError(f"the data-constrained law fits 6 parameters: it needs at least 6 runs, got {len(points)}")
    log_n, log_d, log_l = _log_arrays(points)
    D, grid_points, log_r = np.exp(log_d), make_grid(grid), np.log(np.asarray(r_star_values, float))
    rows = np.log(np.stack([effective_data(D, epochs, np.exp(r)) for r in log_r]))  # (R, n): ln D' per R*_D
    starts = np.concatenate([grid_points[np.argsort(batch_objective(grid_points, log_n[None], row[None],
                                                                     log_l[None], delta)[0])[:n_starts]]
                             for row in rows])
    k = len(starts) // len(rows)
    thetas, values = lbfgs_batch(starts, log_n[None], np.repeat(rows, k, axis=0), log_l[None], delta, max_iter=300,
                                 ftol=1e-7)
    values = np.where(np.isfinite(values), values, np.inf).reshape(len(rows), k)
    best, profile = lbfgs_batch(thetas.reshape(len(rows), k, 5)[np.arange(len(rows)), values.argmin(axis=1)],
                                log_n[None], rows, log_l[None], delta)
    j = int(np.nanargmin(np.where(np.isfinite(profile), profile, np.nan)))
    # Between the best value's neighbours, 41 log-spaced R*_D (about 3% apart), warm-started from its optimum.
    fine = np.linspace(log_r[max(j - 1, 0)], log_r[min(j + 1, len(log_r) - 1)], 41)
    fine_rows = np.log(np.stack([effective_data(D, epochs, np.exp(r)) for r in fine]))
    _, fine_values = lbfgs_batch(np.tile(best[j], (len(fine), 1)), log_n[None], fine_rows, log_l[None], delta)
    log_r_star = float(fine[np.nanargmin(np.where(np.isfinite(fine_values), fine_values, np.nan))])
    theta, value = minimise_from_grid(log_n, np.log(effective_data(D, epochs, np.exp(log_r_star))), log_l,
                                      grid_points, delta)
    E, A, B, alpha, beta = _natural(theta)
    return DataConstrainedFit(E=E, A=A, B=B, alpha=alpha, beta=beta, R_star_D=float(np.exp(log_r_star)),
                              objective=value, n_points=len(points), n_repeated=n_repeated,
                              R_star_D_at_bound=j in (0, len(log_r) - 1))


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


# ------------------------------------------------------------------------------------- approach 1


@dataclass
class TrainingCurve:
    """One run's training curve: tokens seen D and loss at its logged steps, for a model of N parameters.
    A run known only by its final loss is a curve of one point."""

    run: str
    N: float
    D: list[float]
    loss: list[float]
    N_nonembedding: float | None = None


def curves_from_points(points: list[ScalingPoint]) -> list[TrainingCurve]:
    """Each run's final point as a one-point curve (what approach 1 gets when no curves were logged)."""
    return [TrainingCurve(run=p.budget or f"run {i}", N=p.N, D=[p.D], loss=[p.loss], N_nonembedding=p.N_nonembedding)
            for i, p in enumerate(points)]


class _PowerLawAllocation:
    """N_opt ∝ C^a and D_opt ∝ C^b as two fitted power laws (n_law, d_law): approaches 1 and 2."""

    n_law: PowerLaw
    d_law: PowerLaw

    @property
    def a(self) -> float:
        return self.n_law.exponent

    @property
    def b(self) -> float:
        return self.d_law.exponent

    def law_prediction(self, C: float) -> dict:
        """N_opt and D_opt at C from the two laws, with the regression's intervals (None with < 3 points)."""
        return {"C": float(C), "N_opt": float(self.n_law(C)), "D_opt": float(self.d_law(C)),
                "intervals": {"N_opt": self.n_law.prediction_interval(C), "D_opt": self.d_law.prediction_interval(C)}}


@dataclass
class EnvelopeFit(_PowerLawAllocation):
    """Approach 1: the lower envelope of the training curves; then N_opt ∝ C^a and D_opt ∝ C^b over its points.

    budgets[i] is the compute (6 N D) at which run runs[i] (N = n_opt[i], D = d_opt[i]) gave the envelope's
    loss[i]; n_censored envelope points were dropped as not bracketed by other sizes (see fit_approach1)."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss: list[float]
    runs: list[str]
    n_law: PowerLaw
    d_law: PowerLaw
    n_censored: int = 0

    def compute_optimal(self, C: float) -> dict:
        return self.law_prediction(C)


def _prepared_curves(curves: list[TrainingCurve]) -> list[tuple[TrainingCurve, np.ndarray, np.ndarray]]:
    """(curve, ln C at its points in increasing order, losses), with the inputs checked."""
    out = []
    for c in curves:
        d, loss = np.asarray(c.D, float), np.asarray(c.loss, float)
        if d.shape != loss.shape or d.ndim != 1 or d.size == 0:
            raise ValueError(f"curve {c.run!r}: D and loss must be lists of equal, non-zero length")
        if not (c.N > 0 and np.all(d > 0) and np.all(loss > 0) and np.all(np.isfinite(loss))):
            raise ValueError(f"curve {c.run!r}: N, D and loss must be positive and finite")
        order = np.argsort(d)
        out.append((c, np.log(6.0 * c.N * d[order]), loss[order]))
    return out


@dataclass
class EnvelopePoint:
    """The lowest loss at compute C (6 N D of the run that gave it, at its D). bracketed: runs of a smaller and
    of a larger size reach C too (within 5%) and lost, so the optimum at C lies between them."""

    C: float
    curve: TrainingCurve
    loss: float
    bracketed: bool


def lower_envelope(curves: list[TrainingCurve], n_compute: int = 200, rel_tol: float = 0.05) -> list[EnvelopePoint]:
    """The envelope's points, cheapest first: at n_compute log-spaced C, from where 2 runs have started to
    where the last ends (plus the computes of one-point curves, so none is stepped over), the lowest loss
    over the runs. A run that covers C counts with its loss interpolated linearly in ln D (never
    extrapolated); a run that ended before C counts with its final loss, recorded at its own compute: that
    run is a way to spend at most C. So the envelope over one-point curves is the compute frontier."""
    prepared = _prepared_curves(curves)
    if len(prepared) < 2:
        raise ValueError(f"approach 1 needs the curves of at least 2 runs, got {len(prepared)}")
    lo = sorted(lc[0] for _, lc, _ in prepared)[1]
    hi = max(lc[-1] for _, lc, _ in prepared)
    singles = [lc[0] for _, lc, _ in prepared if len(lc) == 1 and lo <= lc[0] <= hi]
    x = np.unique(np.concatenate([np.linspace(lo, hi, n_compute), singles]))
    values, own = np.full((len(prepared), len(x)), np.inf), np.tile(x, (len(prepared), 1))
    for i, (_, lc, loss) in enumerate(prepared):
        inside, after = (x >= lc[0]) & (x <= lc[-1]), x > lc[-1]
        values[i, inside] = np.interp(x[inside], lc, loss)
        values[i, after], own[i, after] = loss[-1], lc[-1]
    winner = values.argmin(axis=0)
    chosen = sorted({(int(i), float(own[i, j])): j for j, i in enumerate(winner)}.items(), key=lambda kv: kv[0][1])
    tol = np.log1p(rel_tol)
    out = []
    for (i, x_own), j in chosen:
        present = [c.N for c, lc, _ in prepared if lc[0] - tol <= x_own <= lc[-1] + tol]
        n = prepared[i][0].N
        out.append(EnvelopePoint(float(np.exp(x_own)), prepared[i][0], float(values[i, j]),
                                 min(present) < n < max(present)))
    return out


def fit_approach1(curves: list[TrainingCurve], confidence: float = 0.95, n_compute: int = 200) -> EnvelopeFit:
    """Approach 1 (Hoffmann et al. 2022): the lower envelope of the training curves (lower_envelope) gives,
    per compute C, the model size N and tokens D that reached the lowest loss; N_opt ∝ C^a and D_opt ∝ C^b
    are fitted through those points. Only bracketed points count: where no smaller (or no larger) size
    reaches C, the envelope's N is the smallest (largest) available, a bound on the optimum rather than the
    optimum (at the top of the range only the largest models have trained long enough, which would bend
    the slope towards 1), so they are dropped and counted in n_censored.

    The N on the envelope only takes the sizes trained, so it is a staircase in C; the slope needs at least
    2 distinct sizes on it, and the t-intervals of a and b treat the envelope points, which share sizes, as
    independent: read them as lower bounds of the uncertainty."""
    envelope = lower_envelope(curves, n_compute)
    kept = [e for e in envelope if e.bracketed]
    if len({e.curve.N for e in kept}) < 2:
        finals = all(len(c.D) == 1 for c in curves)
        raise ValueError(
            "approach 1 needs the lower envelope to pass through at least 2 model sizes that runs of a smaller "
            f"and a larger size bracket at the same compute, found {len({e.curve.N for e in kept})} "
            f"(of {len({c.N for c in curves})} sizes): "
            + ("with final points only, that takes runs of several sizes per compute budget (IsoFLOP); or pass "
               "the runs' training curves" if finals else
               "train sizes on both sides of the optimum, for long enough that their curves overlap in compute")
        )
    budgets = [e.C for e in kept]
    n_opt = [e.curve.N for e in kept]
    d_opt = [C / (6 * n) for C, n in zip(budgets, n_opt, strict=True)]
    return EnvelopeFit(budgets, n_opt, d_opt, [e.loss for e in kept], [e.curve.run for e in kept],
                       fit_power_law(budgets, n_opt, confidence), fit_power_law(budgets, d_opt, confidence),
                       n_censored=len(envelope) - len(kept))


# ------------------------------------------------------------------------------------- approach 2


def group_by_budget(points: list[ScalingPoint], rel_tol: float = 0.05) -> dict[float, list[ScalingPoint]]:
    """Points grouped by compute: runs whose C lies within rel_tol of a group's first C join it. The key is
    the group's geometric-mean compute."""
    groups = [[points[i] for i in g] for g in budget_groups(points, rel_tol)]
    return {float(np.exp(np.mean(np.log([p.compute() for p in g])))): g for g in groups}


@dataclass
class IsoFLOPMinima:
    """Per budget: the parabola in ln N through its losses and, when it lies inside the sizes trained, its minimum."""

    budgets: list[float]
    parabolas: list[list[float]]  # (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 with x = ln N
    n_opt: list[float | None]
    loss_opt: list[float | None]


def _parabola(log_ns: np.ndarray, losses) -> tuple[np.ndarray, float | None]:
    """loss = c2 x^2 + c1 x + c0 in x = ln N, and its vertex when it opens upwards (else None)."""
    coeffs = np.polyfit(log_ns, losses, 2)
    return coeffs, (-coeffs[1] / (2 * coeffs[0]) if coeffs[0] > 0 else None)


def isoflop_minima(points: list[ScalingPoint], rel_tol: float = 0.05) -> IsoFLOPMinima:
    """Approach 2's first step: for every budget with 3+ model sizes, loss = parabola(ln N); its vertex is
    N_opt(C) when the parabola opens upwards and the vertex lies within the sizes trained (else None: the
    sizes miss the optimum and extrapolating a parabola is not trustworthy)."""
    out = IsoFLOPMinima([], [], [], [])
    for C, group in group_by_budget(points, rel_tol).items():
        if len({p.N for p in group}) < 3:
            continue
        x = np.log([p.N for p in group])
        coeffs, x_min = _parabola(x, [p.loss for p in group])
        inside = x_min is not None and x.min() <= x_min <= x.max()
        out.budgets.append(float(C))
        out.parabolas.append([float(c) for c in coeffs])
        out.n_opt.append(float(np.exp(x_min)) if inside else None)
        out.loss_opt.append(float(np.polyval(coeffs, x_min)) if inside else None)
    return out


def edge_diagnostics(points: list[ScalingPoint], rel_tol: float = 0.05) -> list[str]:
    """One warning per IsoFLOP budget (3+ sizes) whose sizes do not bracket the optimum: the lowest loss is
    at the smallest or largest size, or the parabola's vertex lies outside the sizes (or it opens downwards).
    Such a budget's minimum is a bound, not an estimate; approach 2 drops it and approach 3 extrapolates."""
    out = []
    for C, group in group_by_budget(points, rel_tol).items():
        if len({p.N for p in group}) < 3:
            continue
        ns = np.array([p.N for p in group])
        losses = np.array([p.loss for p in group])
        best, lo, hi = ns[losses.argmin()], ns.min(), ns.max()
        _, x_min = _parabola(np.log(ns), losses)
        where = f"budget {C:.3g} FLOPs"
        if best in (lo, hi):
            end, fix = ("smallest", "smaller") if best == lo else ("largest", "larger")
            out.append(f"{where}: the lowest loss is at the {end} size (N={best:.3g}); add {fix} sizes")
        elif x_min is None:
            out.append(f"{where}: the losses do not curve upwards in ln N (the parabola opens downwards); "
                       f"add sizes on both sides of N={best:.3g}")
        elif not np.log(lo) <= x_min <= np.log(hi):
            end, fix = ("below the smallest", "smaller") if x_min < np.log(lo) else ("above the largest", "larger")
            out.append(f"{where}: the parabola's minimum (N={np.exp(x_min):.3g}) lies {end} size "
                       f"(N={lo if fix == 'smaller' else hi:.3g}); add {fix} sizes")
    return out


@dataclass
class IsoFLOPFit(_PowerLawAllocation):
    """Approach 2: per budget the parabola minimum in ln N; then N_opt ∝ C^a and D_opt ∝ C^b.

    bootstrap_laws holds one row (a, ln k_N, b, ln k_D) per bootstrap replicate (N_opt = k_N C^a,
    D_opt = k_D C^b); replicates that could not fit (fewer than 2 budgets with a minimum) are only counted."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]
    parabolas: list[list[float]]  # (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 with x = ln N
    n_law: PowerLaw
    d_law: PowerLaw
    bootstrap_laws: list[list[float]] = field(default_factory=list, repr=False)
    bootstrap_info: dict = field(default_factory=dict, repr=False)

    def bootstrap_interval(self, name: str) -> tuple[float, float] | None:
        """Percentile interval of "a" or "b" over the bootstrap replicates (None without any)."""
        if not self.bootstrap_laws:
            return None
        return _percentile_interval(np.array(self.bootstrap_laws)[:, {"a": 0, "b": 2}[name]], self.n_law.confidence)

    def compute_optimal(self, C: float) -> dict:
        """N_opt and D_opt at C from the two power laws, with the regression's intervals (None if < 3 budgets)
        and the bootstrap's percentile intervals of the prediction (None without a bootstrap)."""
        boot = None
        if self.bootstrap_laws:
            laws = np.array(self.bootstrap_laws)
            with np.errstate(over="ignore"):
                pred = np.exp(laws[:, [1, 3]] + laws[:, [0, 2]] * np.log(C))
            boot = {k: _percentile_interval(pred[:, i], self.n_law.confidence)
                    for i, k in enumerate(("N_opt", "D_opt"))}
        return self.law_prediction(C) | {"bootstrap_intervals": boot}


def fit_isoflop(points: list[ScalingPoint], confidence: float = 0.95, n_bootstrap: int = 200, seed: int = 0,
                resample: str = "budget+run") -> IsoFLOPFit:
    """Approach 2, with the regression's t-intervals of a and b and a bootstrap (resample_runs; n_bootstrap=0
    skips it) that refits the parabolas and then the power laws on every resample. The t-intervals treat
    the budgets' minima as exact; the bootstrap also carries the parabolas' own uncertainty into a and b.
    Its intervals are over the replicates that could fit (bootstrap_info counts the others): with few sizes
    per budget many are skipped, and the intervals are then optimistic."""
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
    fit = IsoFLOPFit(budgets, n_opt, d_opt, [r[2] for r in rows], [r[3] for r in rows],
                     fit_power_law(budgets, n_opt, confidence), fit_power_law(budgets, d_opt, confidence))
    if n_bootstrap > 0:
        resamples = resample_runs(points, n_bootstrap, seed, resample)
        laws = [_isoflop_replicate(points, groups, resamples.by) for groups in resamples.replicates]
        fit.bootstrap_laws = [law for law in laws if law is not None]
        fit.bootstrap_info = {"resample": resamples.by, "resample_note": resamples.note,
                              "fitted": len(fit.bootstrap_laws), "skipped": len(laws) - len(fit.bootstrap_laws)}
    return fit


def _isoflop_replicate(points: list[ScalingPoint], groups: list[np.ndarray], by: str) -> list[float] | None:
    """(a, ln k_N, b, ln k_D) refitted on one resample, or None when fewer than 2 distinct budgets keep a
    minimum inside their sizes. By budget, each index array is one drawn budget (a budget drawn twice counts
    twice); by run, the drawn runs are regrouped by compute."""
    if by == "run":
        budgets = list(group_by_budget([points[i] for i in groups[0]]).items())
    else:
        budgets = [(float(np.exp(np.mean(np.log([points[i].compute() for i in g])))), [points[i] for i in g])
                   for g in groups]
    log_c, log_n = [], []
    for C, group in budgets:
        x = np.log([p.N for p in group])
        if len(set(x.tolist())) < 3:
            continue
        _, x_min = _parabola(x, [p.loss for p in group])
        if x_min is not None and x.min() <= x_min <= x.max():
            log_c.append(np.log(C))
            log_n.append(x_min)
    if len(set(log_c)) < 2:
        return None
    a, ln_k = np.polyfit(log_c, log_n, 1)
    # D_opt = C / (6 N_opt): its law follows from N_opt's.
    return [float(a), float(ln_k), float(1 - a), float(-np.log(6) - ln_k)]


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
