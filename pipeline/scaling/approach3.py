"""Chinchilla approach 3 (Hoffmann et al. 2022): L(N, D) = E + A / N^alpha + B / D^beta fitted to the runs.

fit_chinchilla minimises the Huber loss of the log-loss residuals (pipeline.scaling.objective) by L-BFGS from
every point of a grid of initial values, as in the paper: one batched L-BFGS moves all starts of the grid at
once and scipy's L-BFGS-B then polishes the best few (pipeline.scaling.lbfgs). ChinchillaFit gives the
compute-optimal allocation N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b and the loss there.

The bootstrap resamples whole compute budgets and then runs within them (resample_runs). The replicates are
the shared data weighted by how often each run was drawn, refitted by the same batched L-BFGS from the work of the
full-data fit, reused: its optimum and the other distinct optima its grid pass reached (the basins a resample of
the same runs falls into), plus BOOTSTRAP_STARTS starts drawn from the whole grid per replicate (so a replicate
can still land in a basin the full data did not reach), in memory-bounded chunks. On Chinchilla's 245 published
runs (Epoch's extraction) the default 200 replicates take 10.5 s here, against 64 s with 300 grid starts and no
reuse, with the same estimates and every interval within 0.1% of those (benchmarks/scaling_fit.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.config import SweepConfig
from pipeline.scaling.fit_inputs import ScalingPoint, _log_arrays, budget_groups
from pipeline.scaling.lbfgs import lbfgs_batch, minimise_from_grid
from pipeline.scaling.objective import HUBER_DELTA, PARAM_NAMES, _natural, make_grid
from pipeline.scaling.resampling import _percentile_interval, resample_runs

# Grid starts per bootstrap replicate beside the full-data fit's optima, drawn afresh from the whole grid for each
# one (sweep.bootstrap_starts: the one default). Every one of the 4,500 per replicate would cost 200 full-grid passes.
BOOTSTRAP_STARTS = SweepConfig.bootstrap_starts


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
    theta, value, basins = minimise_from_grid(log_n, log_d, log_l, grid_points, delta, n_polish)
    E, A, B, alpha, beta = _natural(theta)
    fit = ChinchillaFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=value, n_points=len(points),
                        confidence=confidence)
    if n_bootstrap <= 0:
        return fit
    resamples = resample_runs(points, n_bootstrap, seed, resample)
    weights = resamples.weights(len(points))
    usable = _identifiable(weights, budget_groups(points))
    starts = _replicate_starts(theta, grid_points, int(usable.sum()), bootstrap_starts, seed, basins)
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
                      seed: int, basins: np.ndarray | None = None) -> np.ndarray:
    """(R, 1 + m + k, 5) starts per replicate: the full-data optimum, the m other optima the full-data grid pass
    reached (basins) and k grid points drawn without replacement from the whole grid, a different draw per
    replicate (every grid point when n_starts is None or covers the grid). The full-data optima only add
    candidates: each replicate keeps its lowest objective, so they cannot pull a replicate into their basin when
    a grid start finds a better one."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the resamples do not shift with n_starts
    k = len(grid_points) if n_starts is None else min(n_starts, len(grid_points))
    known = np.vstack([theta, *([] if basins is None else [basins.reshape(-1, 5)])])
    picks = [np.arange(len(grid_points)) if k == len(grid_points) else rng.choice(len(grid_points), k, replace=False)
             for _ in range(n_replicates)]
    return np.stack([np.vstack([known, grid_points[idx]]) for idx in picks]).reshape(n_replicates, len(known) + k, 5)


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
