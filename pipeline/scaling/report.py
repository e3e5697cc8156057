"""All fits on one set of runs, as a JSON-serialisable report plus plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.scaling.fit import (
    ScalingPoint,
    compute_optimal_interval,
    fit_chinchilla,
    fit_isoflop,
    fit_kaplan,
    isoflop_minima,
    write_points_csv,
)
from pipeline.scaling.plots import plot_frontier, plot_isoflop, plot_loss_vs_n

log = logging.getLogger(__name__)

REPORT_FILE = "scaling_fit.json"


def fit_all(points: list[ScalingPoint], budgets: list[float], n_bootstrap: int = 200, seed: int = 0):
    """(report dict, approach-3 fit or None, approach-2 fit or None). A fit that the data cannot support is
    reported with its reason instead of failing the others."""
    report: dict = {"n_points": len(points), "points": [vars(p) | {"C": p.compute()} for p in points]}
    chinchilla = iso = None
    try:
        chinchilla = fit_chinchilla(points, n_bootstrap=n_bootstrap, seed=seed)
        report["approach3"] = chinchilla.to_dict()
        report["bootstrap_params"] = chinchilla.bootstrap_params
        report["predictions"] = []
        for C in budgets:
            n_opt, d_opt, loss = chinchilla.compute_optimal(C)
            report["predictions"].append({"C": C, "N_opt": n_opt, "D_opt": d_opt, "loss": loss,
                                          "intervals": compute_optimal_interval(chinchilla, C)})
    except ValueError as err:
        report["approach3"] = {"error": str(err)}
    try:
        iso = fit_isoflop(points)
        report["approach2"] = {
            "budgets": iso.budgets, "N_opt": iso.n_opt, "D_opt": iso.d_opt, "loss_opt": iso.loss_opt,
            "a": iso.n_law.exponent, "a_interval": iso.n_law.exponent_interval,
            "b": iso.d_law.exponent, "b_interval": iso.d_law.exponent_interval,
        }
    except ValueError as err:
        report["approach2"] = {"error": str(err)}
    try:
        report["kaplan"] = vars(fit_kaplan(points))
    except ValueError as err:
        report["kaplan"] = {"error": str(err)}
    return report, chinchilla, iso


def write_report(points: list[ScalingPoint], out_dir: Path, budgets: list[float], n_bootstrap: int = 200) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    report, chinchilla, iso = fit_all(points, budgets, n_bootstrap)
    write_points_csv(points, out_dir / "points.csv")
    plots = [plot_loss_vs_n(points, chinchilla, out_dir / "loss_vs_n.png")]
    minima = isoflop_minima(points)
    if minima.budgets:
        plots.append(plot_isoflop(points, minima, out_dir / "isoflop.png"))
    if chinchilla is not None or iso is not None:
        plots.append(plot_frontier(chinchilla, iso, budgets, out_dir / "frontier.png"))
    report["plots"] = [p.name for p in plots]
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=float))
    return report


def summary(report: dict) -> str:
    lines = []
    a3 = report.get("approach3", {})
    if "error" not in a3:
        iv = a3["intervals"]
        lines.append(
            f"approach 3: E={a3['E']:.3f} [{iv['E'][0]:.3f}, {iv['E'][1]:.3f}]  A={a3['A']:.4g}  B={a3['B']:.4g}  "
            f"alpha={a3['alpha']:.3f} [{iv['alpha'][0]:.3f}, {iv['alpha'][1]:.3f}]  "
            f"beta={a3['beta']:.3f} [{iv['beta'][0]:.3f}, {iv['beta'][1]:.3f}]  a={a3['a']:.3f} b={a3['b']:.3f}"
        )
        for p in report.get("predictions", []):
            iv = p["intervals"]
            n_iv = f" [{iv['N_opt'][0]:.3g}, {iv['N_opt'][1]:.3g}]" if iv else ""
            l_iv = f" [{iv['loss'][0]:.3f}, {iv['loss'][1]:.3f}]" if iv else ""
            lines.append(f"  C={p['C']:.3g}: N_opt={p['N_opt']:.3g}{n_iv}  D_opt={p['D_opt']:.3g}  "
                         f"loss={p['loss']:.3f}{l_iv}")
    else:
        lines.append(f"approach 3: {a3['error']}")
    a2 = report.get("approach2", {})
    lines.append(f"approach 2: a={a2['a']:.3f} b={a2['b']:.3f}" if "error" not in a2 else f"approach 2: {a2['error']}")
    k = report.get("kaplan", {})
    if "error" not in k:
        lines.append(f"Kaplan: alpha_N={k['alpha_N']:.3f}  alpha_C={k['alpha_C']:.3f}")
    return "\n".join(lines)
