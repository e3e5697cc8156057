"""Chinchilla approach 2 (Hoffmann et al. 2022), IsoFLOP profiles: per compute budget a parabola in ln N
through the losses, its minimum N_opt(C); then N_opt ∝ C^a and D_opt ∝ C^b, with a bootstrap. Also the
diagnostics of budgets whose sizes miss the optimum (edge_diagnostics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.scaling.fit_inputs import ScalingPoint, group_by_budget
from pipeline.scaling.power_law import PowerLaw, _PowerLawAllocation, fit_power_law
from pipeline.scaling.resampling import _percentile_interval, resample_runs


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
