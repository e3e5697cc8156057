"""Kaplan-style power laws (Kaplan et al. 2020): L(N) on the lowest loss per model size and L(C) on the
compute frontier.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from pipeline.scaling.fit_inputs import ScalingPoint
from pipeline.scaling.power_law import PowerLaw, fit_power_law


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
    # In logs: a nearly flat law (alpha near 0, as on a tiny sweep whose sizes barely differ in loss) puts X_c
    # beyond a float, which the report writes as null rather than fail the whole fit.
    alpha = -law.exponent
    log_x_c = math.log(law.coefficient) / alpha if alpha > 0 else math.inf
    x_c = math.exp(log_x_c) if log_x_c < math.log(sys.float_info.max) else math.inf
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
