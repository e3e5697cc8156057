"""All fits on one set of runs, as a JSON-serialisable report plus plots.

Report layout (scaling_fit.json):
    n_points, points                      the runs fitted (N, D, loss, C, budget, N_nonembedding)
    approach3                             E, A, B, alpha, beta, objective, a, b, G, intervals {name: [lo, hi]}
    predictions                           per budget: C, N_opt, D_opt, loss, tokens_per_param, intervals
    approach2                             budgets, N_opt, D_opt, loss_opt, a, b and their intervals,
                                          predictions per budget (N_opt, D_opt with regression intervals)
    kaplan                                alpha_N, N_c, alpha_C, C_c and intervals
    bootstrap_params                      rows (E, A, B, alpha, beta), one per bootstrap replicate
A fit the data cannot support holds {"error": reason} instead. Non-finite numbers are written as null.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from pipeline.scaling.fit import (
    ChinchillaFit,
    IsoFLOPFit,
    ScalingPoint,
    compute_optimal_allocation,
    fit_chinchilla,
    fit_isoflop,
    fit_kaplan,
    isoflop_minima,
    write_points_csv,
)
from pipeline.scaling.plots import plot_frontier, plot_isoflop, plot_loss_vs_n

log = logging.getLogger(__name__)

REPORT_FILE = "scaling_fit.json"


def _json_safe(value):
    """Plain Python containers and floats; NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _fit_models(points: list[ScalingPoint], budgets_to_predict: list[float], n_bootstrap: int, confidence: float,
                seed: int, grid) -> tuple[dict, ChinchillaFit | None, IsoFLOPFit | None]:
    report: dict = {"n_points": len(points), "confidence": confidence,
                    "points": [dataclasses.asdict(p) | {"C": p.compute()} for p in points]}
    chinchilla = iso = None
    try:
        chinchilla = fit_chinchilla(points, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, grid=grid)
        report["approach3"] = chinchilla.to_dict()
        report["predictions"] = [compute_optimal_allocation(chinchilla, C) for C in budgets_to_predict]
        report["bootstrap_params"] = chinchilla.bootstrap_params
    except ValueError as err:
        report["approach3"] = {"error": str(err)}
    try:
        iso = fit_isoflop(points, confidence)
        report["approach2"] = {
            "budgets": iso.budgets, "N_opt": iso.n_opt, "D_opt": iso.d_opt, "loss_opt": iso.loss_opt,
            "a": iso.a, "a_interval": iso.n_law.exponent_interval,
            "b": iso.b, "b_interval": iso.d_law.exponent_interval,
            "predictions": [iso.compute_optimal(C) for C in budgets_to_predict],
        }
    except ValueError as err:
        report["approach2"] = {"error": str(err)}
    try:
        report["kaplan"] = dataclasses.asdict(fit_kaplan(points, confidence))
    except ValueError as err:
        report["kaplan"] = {"error": str(err)}
    return _json_safe(report), chinchilla, iso


def fit_all(points: list[ScalingPoint], budgets_to_predict: list[float], *, n_bootstrap: int = 200,
            confidence: float = 0.95, seed: int = 0, grid: dict | None = None) -> dict:
    """Approaches 2 and 3 and the Kaplan laws on the runs, with compute-optimal predictions at each budget
    (FLOPs); a JSON-serialisable dict (see the module docstring). A fit that the data cannot support is
    reported with its reason instead of failing the others."""
    return _fit_models(points, budgets_to_predict, n_bootstrap, confidence, seed, grid)[0]


def write_report(points: list[ScalingPoint], out_dir: Path, budgets: list[float], n_bootstrap: int = 200,
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """fit_all, then out_dir/scaling_fit.json, points.csv and the PNGs (loss_vs_n, isoflop when some budget
    has 3+ sizes, frontier when approach 2 or 3 fitted). Returns the report, with "plots" naming the PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, chinchilla, iso = _fit_models(points, budgets, n_bootstrap, confidence, seed, None)
    write_points_csv(points, out_dir / "points.csv")
    plots = [plot_loss_vs_n(points, chinchilla, out_dir / "loss_vs_n.png")]
    minima = isoflop_minima(points)
    if minima.budgets:
        plots.append(plot_isoflop(points, minima, out_dir / "isoflop.png"))
    if chinchilla is not None or iso is not None:
        plots.append(plot_frontier(chinchilla, iso, budgets, out_dir / "frontier.png", points=points))
    report["plots"] = [p.name for p in plots]
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _iv(intervals: dict, key: str, fmt: str) -> str:
    pair = (intervals or {}).get(key)
    return f" [{pair[0]:{fmt}}, {pair[1]:{fmt}}]" if pair and None not in pair else ""


def summary(report: dict) -> str:
    lines = []
    a3 = report.get("approach3", {})
    if "error" not in a3:
        iv = a3["intervals"]
        lines.append(
            f"approach 3: E={a3['E']:.3f}{_iv(iv, 'E', '.3f')}  A={a3['A']:.4g}  B={a3['B']:.4g}  "
            f"alpha={a3['alpha']:.3f}{_iv(iv, 'alpha', '.3f')}  beta={a3['beta']:.3f}{_iv(iv, 'beta', '.3f')}  "
            f"a={a3['a']:.3f}{_iv(iv, 'a', '.3f')} b={a3['b']:.3f}"
        )
        for p in report.get("predictions", []):
            iv = p["intervals"]
            lines.append(f"  C={p['C']:.3g}: N_opt={p['N_opt']:.3g}{_iv(iv, 'N_opt', '.3g')}  "
                         f"D_opt={p['D_opt']:.3g}{_iv(iv, 'D_opt', '.3g')}  loss={p['loss']:.3f}{_iv(iv, 'loss', '.3f')}")
    else:
        lines.append(f"approach 3: {a3['error']}")
    a2 = report.get("approach2", {})
    if "error" not in a2:
        a_iv = a2["a_interval"]
        a_text = f" [{a_iv[0]:.3f}, {a_iv[1]:.3f}]" if a_iv else ""
        lines.append(f"approach 2: a={a2['a']:.3f}{a_text} b={a2['b']:.3f} ({len(a2['budgets'])} budgets)")
    else:
        lines.append(f"approach 2: {a2['error']}")
    k = report.get("kaplan", {})
    if "error" not in k:
        lines.append(f"Kaplan: alpha_N={k['alpha_N']:.3f} (on {k['n_basis']})  alpha_C={k['alpha_C']:.3f}")
    else:
        lines.append(f"Kaplan: {k['error']}")
    return "\n".join(lines)
