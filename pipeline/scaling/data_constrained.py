"""The data-constrained law (Muennighoff et al. 2023) for runs that repeat their data: approach 3's law on
the effective data D' (effective_data), with R*_D (what a repeated epoch is worth) found by a profile over
ln R*_D (fit_data_constrained).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.scaling.fit_inputs import ScalingPoint, _log_arrays
from pipeline.scaling.lbfgs import lbfgs_batch, minimise_from_grid
from pipeline.scaling.objective import HUBER_DELTA, _natural, batch_objective, make_grid

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
    theta, value, _ = minimise_from_grid(log_n, np.log(effective_data(D, epochs, np.exp(log_r_star))), log_l,
                                      grid_points, delta)
    E, A, B, alpha, beta = _natural(theta)
    return DataConstrainedFit(E=E, A=A, B=B, alpha=alpha, beta=beta, R_star_D=float(np.exp(log_r_star)),
                              objective=value, n_points=len(points), n_repeated=n_repeated,
                              R_star_D_at_bound=j in (0, len(log_r) - 1))
