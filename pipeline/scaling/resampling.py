"""Bootstrap resamples of the runs (resample_runs: by compute budget, then by run within each budget, or by
run) and the percentile interval over the replicates' estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.scaling.fit_inputs import ScalingPoint, budget_groups

RESAMPLE_MODES = ("budget+run", "run")


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


def _percentile_interval(values, confidence: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)
