"""Scaling-law fits: Chinchilla approaches 2 and 3 (Hoffmann et al. 2022) and Kaplan-style power laws.

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta by minimising the Huber loss (delta 1e-3) between
the log of the predicted and the observed loss, in the log-sum-exp parameterisation
    log L(N, D) = LSE(a - alpha log N, b - beta log D, e),   A = e^a, B = e^b, E = e^e,
with L-BFGS-B from a grid of initial values. The objective and its gradient are analytic and vectorised:
the whole grid is scored in one numpy pass and L-BFGS-B refines the best starts.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
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


@dataclass
class ScalingPoint:
    """One training run: parameters N, training tokens D, final loss; C = 6 N D unless given."""

    N: float
    D: float
    loss: float
    C: float | None = None
    budget: str | None = None

    def compute(self) -> float:
        return self.C if self.C else 6.0 * self.N * self.D


def load_points_csv(path: str | Path) -> list[ScalingPoint]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"N", "D", "loss"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: it needs N, D, loss (and C)")
    return [ScalingPoint(float(r["N"]), float(r["D"]), float(r["loss"]), float(r["C"]) if r.get("C") else None,
                         r.get("budget") or None) for r in rows]


def write_points_csv(points: list[ScalingPoint], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["N", "D", "loss", "C", "budget"])
        writer.writeheader()
        for p in points:
            writer.writerow({"N": p.N, "D": p.D, "loss": p.loss, "C": p.compute(), "budget": p.budget or ""})


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Summed Huber loss of log-loss residuals, and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    pred = top + np.log(total)
    weights /= total
    value, dh = _huber(pred - log_l, delta)
    grad = np.array([
        (dh * weights[0]).sum(),
        (dh * weights[1]).sum(),
        (dh * weights[2]).sum(),
        -(dh * weights[0] * log_n).sum(),
        -(dh * weights[1] * log_d).sum(),
    ])
    return value.sum(), grad


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """Objective at every grid point at once: grid (G, 5) -> (G,)."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    top = terms.max(axis=0)
    pred = top + np.log(np.exp(terms - top).sum(axis=0))
    value, _ = _huber(pred - log_l, delta)
    return value.sum(axis=1)


def _make_grid(grid: dict[str, np.ndarray] | None) -> np.ndarray:
    g = {**DEFAULT_GRID, **(grid or {})}
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), dtype=float)


def _refine(starts: np.ndarray, log_n, log_d, log_l, delta) -> tuple[np.ndarray, float]:
    best, best_value = None, np.inf
    bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
    for start in starts:
        result = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                          bounds=bounds, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if result.fun < best_value:
            best, best_value = result.x, float(result.fun)
    return best, best_value


@dataclass
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    confidence: float = 0.95
    bootstrap_params: list[list[float]] = field(default_factory=list, repr=False)

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
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, C: float) -> tuple[float, float, float]:
        """(N_opt, D_opt, predicted loss) for compute C under C = 6 N D."""
        n_opt = self.G * (C / 6.0) ** self.a
        d_opt = (C / 6.0) ** self.b / self.G
        return n_opt, d_opt, float(self.loss(n_opt, d_opt))

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "bootstrap_params"}
        out.update(a=self.a, b=self.b, G=self.G)
        return out


def fit_chinchilla(
    points: list[ScalingPoint],
    *,
    grid: dict[str, np.ndarray] | None = None,
    n_starts: int = 32,
    delta: float = HUBER_DELTA,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> ChinchillaFit:
    """Approach 3 with bootstrap (resampling points) percentile intervals for every parameter."""
    if len(points) < 5:
        raise ValueError(f"approach 3 fits 5 parameters: it needs at least 5 runs, got {len(points)}")
    log_n = np.log([p.N for p in points])
    log_d = np.log([p.D for p in points])
    log_l = np.log([p.loss for p in points])
    grid_points = _make_grid(grid)
    scores = _grid_objective(grid_points, log_n, log_d, log_l, delta)
    starts = grid_points[np.argsort(scores)[:n_starts]]
    theta, value = _refine(starts, log_n, log_d, log_l, delta)
    fit = _to_fit(theta, value, len(points), confidence)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(points), len(points))
        local = (log_n[idx], log_d[idx], log_l[idx], delta)
        boot_scores = _grid_objective(grid_points, *local)
        boot_starts = np.vstack([theta, grid_points[np.argsort(boot_scores)[:3]]])
        boot_theta, _ = _refine(boot_starts, *local)
        samples.append(_natural(boot_theta))
    if samples:
        arr = np.array(samples)
        lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
        names = ["E", "A", "B", "alpha", "beta"]
        fit.intervals = {n: (float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi)))
                         for i, n in enumerate(names)}
        alphas, betas = arr[:, 3], arr[:, 4]
        for name, values in (("a", betas / (alphas + betas)), ("b", alphas / (alphas + betas))):
            fit.intervals[name] = (float(np.percentile(values, lo)), float(np.percentile(values, hi)))
        fit.bootstrap_params = arr.tolist()
    return fit


def _natural(theta: np.ndarray) -> list[float]:
    a, b, e, alpha, beta = theta
    return [float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta)]


def _to_fit(theta: np.ndarray, value: float, n: int, confidence: float) -> ChinchillaFit:
    E, A, B, alpha, beta = _natural(theta)
    return ChinchillaFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=value, n_points=n, confidence=confidence)


def compute_optimal_interval(fit: ChinchillaFit, C: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of N_opt, D_opt and the predicted loss at C over the bootstrap fits."""
    if not fit.bootstrap_params:
        return {}
    rows = []
    for E, A, B, alpha, beta in fit.bootstrap_params:
        boot = ChinchillaFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=0, n_points=0)
        rows.append(boot.compute_optimal(C))
    arr = np.array(rows)
    lo, hi = 100 * (1 - fit.confidence) / 2, 100 * (1 + fit.confidence) / 2
    return {name: (float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi)))
            for i, name in enumerate(["N_opt", "D_opt", "loss"])}


@dataclass
class PowerLaw:
    """y = k * x^exponent, fitted in log-log space; intervals from the regression's standard errors."""

    exponent: float
    coefficient: float
    exponent_interval: tuple[float, float]
    n_points: int

    def __call__(self, x):
        return self.coefficient * np.power(x, self.exponent)


def fit_power_law(x, y, confidence: float = 0.95) -> PowerLaw:
    from scipy import stats

    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2:
        raise ValueError("a power law needs at least 2 points")
    res = stats.linregress(lx, ly)
    if len(lx) > 2:
        t = stats.t.ppf((1 + confidence) / 2, len(lx) - 2)
        interval = (float(res.slope - t * res.stderr), float(res.slope + t * res.stderr))
    else:
        interval = (float(res.slope), float(res.slope))
    return PowerLaw(float(res.slope), float(np.exp(res.intercept)), interval, len(lx))


@dataclass
class IsoFLOPFit:
    """Approach 2: per budget the parabola minimum in log N; then N_opt ∝ C^a and D_opt ∝ C^b."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]
    parabolas: list[list[float]]  # (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 with x = ln N
    n_law: PowerLaw
    d_law: PowerLaw


def group_by_budget(points: list[ScalingPoint], rel_tol: float = 0.05) -> dict[float, list[ScalingPoint]]:
    """Points grouped by compute (C within rel_tol of each other form one IsoFLOP budget)."""
    groups: dict[float, list[ScalingPoint]] = {}
    for p in sorted(points, key=lambda q: q.compute()):
        key = next((c for c in groups if abs(p.compute() - c) <= rel_tol * c), None)
        groups.setdefault(p.compute() if key is None else key, []).append(p)
    return groups


@dataclass
class IsoFLOPMinima:
    """Per budget: the parabola in ln N through its losses and, when it lies inside the sizes trained, its minimum."""

    budgets: list[float]
    parabolas: list[list[float]]  # (c2, c1, c0) of loss = c2 x^2 + c1 x + c0 with x = ln N
    n_opt: list[float | None]
    loss_opt: list[float | None]


def isoflop_minima(points: list[ScalingPoint]) -> IsoFLOPMinima:
    out = IsoFLOPMinima([], [], [], [])
    for C, group in group_by_budget(points).items():
        if len({p.N for p in group}) < 3:
            continue
        x = np.log([p.N for p in group])
        coeffs = np.polyfit(x, [p.loss for p in group], 2)
        x_min = -coeffs[1] / (2 * coeffs[0]) if coeffs[0] > 0 else None
        inside = x_min is not None and x.min() <= x_min <= x.max()  # else the sizes miss the optimum
        out.budgets.append(float(C))
        out.parabolas.append([float(c) for c in coeffs])
        out.n_opt.append(float(np.exp(x_min)) if inside else None)
        out.loss_opt.append(float(np.polyval(coeffs, x_min)) if inside else None)
    return out


def fit_isoflop(points: list[ScalingPoint]) -> IsoFLOPFit:
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
                      fit_power_law(budgets, n_opt), fit_power_law(budgets, d_opt))


@dataclass
class KaplanFit:
    """L(N) = (N_c / N)^alpha_N and L(C) = (C_c / C)^alpha_C (Kaplan et al. 2020)."""

    alpha_N: float
    N_c: float
    alpha_N_interval: tuple[float, float]
    alpha_C: float
    C_c: float
    alpha_C_interval: tuple[float, float]


def fit_kaplan(points: list[ScalingPoint]) -> KaplanFit:
    """L(N) on the best loss of each model size (data-unconstrained limit); L(C) on the compute frontier:
    the lowest loss reached at or below each budget."""
    by_n: dict[float, float] = {}
    for p in points:
        by_n[p.N] = min(by_n.get(p.N, np.inf), p.loss)
    ns = sorted(by_n)
    law_n = fit_power_law(ns, [by_n[n] for n in ns])
    frontier_c, frontier_l, best = [], [], np.inf
    for p in sorted(points, key=lambda q: q.compute()):
        if p.loss < best:
            best = p.loss
            frontier_c.append(p.compute())
            frontier_l.append(p.loss)
    law_c = fit_power_law(frontier_c, frontier_l) if len(frontier_c) >= 2 else law_n
    # L = (X_c / X)^alpha  <=>  log L = alpha log X_c - alpha log X: exponent = -alpha, k = X_c^alpha.
    alpha_n, alpha_c = -law_n.exponent, -law_c.exponent
    return KaplanFit(
        alpha_N=alpha_n, N_c=float(law_n.coefficient ** (1 / alpha_n)) if alpha_n else float("inf"),
        alpha_N_interval=(-law_n.exponent_interval[1], -law_n.exponent_interval[0]),
        alpha_C=alpha_c, C_c=float(law_c.coefficient ** (1 / alpha_c)) if alpha_c else float("inf"),
        alpha_C_interval=(-law_c.exponent_interval[1], -law_c.exponent_interval[0]),
    )
