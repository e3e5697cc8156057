"""All fits on one set of runs, as a JSON-serialisable report plus plots.

Report layout (scaling_fit.json):
    n_points, points                      the runs fitted (N, D, loss, C, budget, N_nonembedding, epochs)
    approach3                             E, A, B, alpha, beta, objective, a, b, G, intervals {name: [lo, hi]}
    predictions                           per budget: C, N_opt, D_opt, loss, tokens_per_param, intervals
    approach2                             budgets, N_opt, D_opt, loss_opt, a, b, their regression t-intervals
                                          (a_interval, b_interval) and bootstrap percentile intervals
                                          (a_bootstrap_interval, b_bootstrap_interval), predictions per budget
                                          (N_opt, D_opt with regression intervals and bootstrap_intervals)
    approach1                             the lower envelope of the training curves (or of the runs' final
                                          points): budgets, N_opt, D_opt, loss, runs, a, a_interval, b,
                                          b_interval, n_censored, source, predictions
    data_constrained                      E, A, B, alpha, beta, R_star_D, objective, n_points, n_repeated,
                                          R_star_D_at_bound when runs repeat data; else {"skipped": reason}
    kaplan                                alpha_N, N_c, alpha_C, C_c and intervals
    bootstrap                             n_bootstrap, resample (how it was done: "budget+run" or "run"),
                                          resample_requested, resample_note (why it fell back to by run),
                                          approach3 / approach2: replicates fitted and skipped
    bootstrap_params                      rows (E, A, B, alpha, beta), one per approach-3 bootstrap replicate
    diagnostics                           warnings about the data (IsoFLOP budgets whose sizes miss the optimum)
A fit the data cannot support holds {"error": reason} instead. Non-finite numbers are written as null.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from pipeline.scaling.approach1 import EnvelopeFit, fit_approach1
from pipeline.scaling.approach2 import IsoFLOPFit, edge_diagnostics, fit_isoflop, isoflop_minima
from pipeline.scaling.approach3 import (
    BOOTSTRAP_STARTS,
    ChinchillaFit,
    compute_optimal_allocation,
    fit_chinchilla,
)
from pipeline.scaling.data_constrained import fit_data_constrained
from pipeline.scaling.fit_files import REPORT_FILE
from pipeline.scaling.fit_inputs import ScalingPoint, TrainingCurve, curves_from_points, write_points_csv
from pipeline.scaling.kaplan import fit_kaplan
from pipeline.scaling.plots import plot_frontier, plot_isoflop, plot_loss_vs_n
from pipeline.scaling.resampling import resample_runs

log = logging.getLogger(__name__)



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


@dataclasses.dataclass
class _Fits:
    chinchilla: ChinchillaFit | None = None
    iso: IsoFLOPFit | None = None
    envelope: EnvelopeFit | None = None


def _approach2(iso: IsoFLOPFit, budgets_to_predict: list[float]) -> dict:
    return {"budgets": iso.budgets, "N_opt": iso.n_opt, "D_opt": iso.d_opt, "loss_opt": iso.loss_opt,
            "a": iso.a, "a_interval": iso.n_law.exponent_interval, "a_bootstrap_interval": iso.bootstrap_interval("a"),
            "b": iso.b, "b_interval": iso.d_law.exponent_interval, "b_bootstrap_interval": iso.bootstrap_interval("b"),
            "predictions": [iso.compute_optimal(C) for C in budgets_to_predict]}


def _approach1(env: EnvelopeFit, budgets_to_predict: list[float], source: str) -> dict:
    return {"budgets": env.budgets, "N_opt": env.n_opt, "D_opt": env.d_opt, "loss": env.loss, "runs": env.runs,
            "a": env.a, "a_interval": env.n_law.exponent_interval,
            "b": env.b, "b_interval": env.d_law.exponent_interval,
            "n_censored": env.n_censored, "source": source,
            "predictions": [env.compute_optimal(C) for C in budgets_to_predict]}


def _bootstrap_report(points: list[ScalingPoint], fits: _Fits, n_bootstrap: int, resample: str, seed: int) -> dict:
    if n_bootstrap <= 0:
        return {"n_bootstrap": 0}
    plan = resample_runs(points, 0, seed, resample)  # how the fits resampled: by budget, or why not
    out = {"n_bootstrap": n_bootstrap, "resample": plan.by, "resample_requested": resample, "resample_note": plan.note}
    for name, fit in (("approach3", fits.chinchilla), ("approach2", fits.iso)):
        if fit is not None and fit.bootstrap_info:
            out[name] = {k: v for k, v in fit.bootstrap_info.items() if k not in ("resample", "resample_note")}
    return out


def _fit_models(points: list[ScalingPoint], budgets_to_predict: list[float], n_bootstrap: int, confidence: float,
                seed: int, grid, curves: list[TrainingCurve] | None, resample: str,
                bootstrap_starts: int | None) -> tuple[dict, _Fits]:
    report: dict = {"n_points": len(points), "confidence": confidence,
                    "points": [dataclasses.asdict(p) | {"C": p.compute()} for p in points]}
    fits = _Fits()
    try:
        fits.chinchilla = fit_chinchilla(points, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, grid=grid,
                                         resample=resample, bootstrap_starts=bootstrap_starts)
        report["approach3"] = fits.chinchilla.to_dict()
        report["predictions"] = [compute_optimal_allocation(fits.chinchilla, C) for C in budgets_to_predict]
        report["bootstrap_params"] = fits.chinchilla.bootstrap_params
    except ValueError as err:
        report["approach3"] = {"error": str(err)}
    try:
        fits.iso = fit_isoflop(points, confidence, n_bootstrap=n_bootstrap, seed=seed, resample=resample)
        report["approach2"] = _approach2(fits.iso, budgets_to_predict)
    except ValueError as err:
        report["approach2"] = {"error": str(err)}
    source = "training curves" if curves is not None else "final points (one-point curves)"
    try:
        fits.envelope = fit_approach1(curves if curves is not None else curves_from_points(points), confidence)
        report["approach1"] = _approach1(fits.envelope, budgets_to_predict, source)
    except ValueError as err:
        report["approach1"] = {"error": str(err)}
    if not any(p.epochs is not None and p.epochs > 1 for p in points):
        report["data_constrained"] = {"skipped": "no run repeats data"}
    else:
        try:
            report["data_constrained"] = dataclasses.asdict(fit_data_constrained(points, grid=grid))
        except ValueError as err:
            report["data_constrained"] = {"error": str(err)}
    try:
        report["kaplan"] = dataclasses.asdict(fit_kaplan(points, confidence))
    except ValueError as err:
        report["kaplan"] = {"error": str(err)}
    report["bootstrap"] = _bootstrap_report(points, fits, n_bootstrap, resample, seed)
    report["diagnostics"] = edge_diagnostics(points)
    for warning in report["diagnostics"]:
        log.warning(warning)
    return _json_safe(report), fits


def fit_all(points: list[ScalingPoint], budgets_to_predict: list[float], *, n_bootstrap: int = 200,
            confidence: float = 0.95, seed: int = 0, grid: dict | None = None,
            curves: list[TrainingCurve] | None = None, resample: str = "budget+run",
            bootstrap_starts: int | None = BOOTSTRAP_STARTS) -> dict:
    """Approaches 1, 2 and 3, the data-constrained law (when runs repeat data) and the Kaplan laws on the
    runs, with compute-optimal predictions at each budget (FLOPs); a JSON-serialisable dict (see the module
    docstring). curves are the runs' training curves for approach 1 (None: each run's final point is a
    one-point curve). A fit that the data cannot support is reported with its reason instead of failing
    the others."""
    return _fit_models(points, budgets_to_predict, n_bootstrap, confidence, seed, grid, curves, resample,
                       bootstrap_starts)[0]


def write_report(points: list[ScalingPoint], out_dir: Path, budgets: list[float], n_bootstrap: int = 200,
                 confidence: float = 0.95, seed: int = 0, curves: list[TrainingCurve] | None = None,
                 resample: str = "budget+run", bootstrap_starts: int | None = BOOTSTRAP_STARTS) -> dict:
    """fit_all, then out_dir/scaling_fit.json, points.csv and the PNGs (loss_vs_n, isoflop when some budget
    has 3+ sizes, frontier when approach 1, 2 or 3 fitted). Returns the report, with "plots" naming the PNGs.
    Approach 3's bootstrap dominates the time, about linearly in bootstrap_starts (grid starts per replicate)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, fits = _fit_models(points, budgets, n_bootstrap, confidence, seed, None, curves, resample,
                               bootstrap_starts)
    write_points_csv(points, out_dir / "points.csv")
    plots = [plot_loss_vs_n(points, fits.chinchilla, out_dir / "loss_vs_n.png")]
    minima = isoflop_minima(points)
    if minima.budgets:
        plots.append(plot_isoflop(points, minima, out_dir / "isoflop.png"))
    if fits.chinchilla is not None or fits.iso is not None or fits.envelope is not None:
        plots.append(plot_frontier(fits.chinchilla, fits.iso, budgets, out_dir / "frontier.png", points=points,
                                   envelope=fits.envelope))
    report["plots"] = [p.name for p in plots]
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _iv(intervals: dict, key: str, fmt: str) -> str:
    pair = (intervals or {}).get(key)
    return f" [{pair[0]:{fmt}}, {pair[1]:{fmt}}]" if pair and None not in pair else ""


def _exponent_line(name: str, fit: dict, interval_key: str, note: str) -> str:
    """ "approach N: a=... [lo, hi] b=... [lo, hi] (note)" with the intervals under interval_key(+_b)."""
    a_iv, b_iv = fit.get(f"a_{interval_key}"), fit.get(f"b_{interval_key}")
    a_text = f" [{a_iv[0]:.3f}, {a_iv[1]:.3f}]" if a_iv and None not in a_iv else ""
    b_text = f" [{b_iv[0]:.3f}, {b_iv[1]:.3f}]" if b_iv and None not in b_iv else ""
    return f"{name}: a={fit['a']:.3f}{a_text} b={fit['b']:.3f}{b_text} ({note})"


def _other_lines(report: dict) -> list[str]:
    """Approaches 2 and 1, the data-constrained law and Kaplan's, one line each."""
    lines = []
    a2, conf = report.get("approach2", {}), report.get("confidence", 0.95)
    if "error" in a2:
        lines.append(f"approach 2: {a2['error']}")
    elif a2.get("a_bootstrap_interval"):
        boot = report.get("bootstrap", {})
        done = boot.get("approach2", {})
        lines.append(_exponent_line("approach 2", a2, "bootstrap_interval",
                                    f"{len(a2['budgets'])} budgets; {conf:.0%} bootstrap by {boot.get('resample')}, "
                                    f"{done.get('fitted')} of {boot.get('n_bootstrap')} replicates fitted"))
    else:
        lines.append(_exponent_line("approach 2", a2, "interval",
                                    f"{len(a2['budgets'])} budgets; regression t-interval"))
    a1 = report.get("approach1", {})
    if "error" in a1:
        lines.append(f"approach 1: {a1['error']}")
    elif a1:
        lines.append(_exponent_line("approach 1", a1, "interval", f"envelope of {a1['source']}: {len(a1['budgets'])} "
                                    f"points, {len(set(a1['N_opt']))} sizes; t-interval"))
    dc = report.get("data_constrained", {})
    if "E" in dc:
        bound = " (at the end of the range searched: a bound)" if dc["R_star_D_at_bound"] else ""
        lines.append(f"data-constrained: R*_D={dc['R_star_D']:.3g}{bound}  E={dc['E']:.3f}  alpha={dc['alpha']:.3f}  "
                     f"beta={dc['beta']:.3f} ({dc['n_repeated']} of {dc['n_points']} runs repeat data)")
    elif dc:
        lines.append(f"data-constrained: {dc.get('error') or dc.get('skipped')}")
    k = report.get("kaplan", {})
    if "error" not in k:
        lines.append(f"Kaplan: alpha_N={k['alpha_N']:.3f} (on {k['n_basis']})  alpha_C={k['alpha_C']:.3f}")
    else:
        lines.append(f"Kaplan: {k['error']}")
    return lines


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
    lines += _other_lines(report)
    note = report.get("bootstrap", {}).get("resample_note")
    if note:
        lines.append(f"bootstrap: {note}")
    lines += [f"warning: {w}" for w in report.get("diagnostics", [])]
    return "\n".join(lines)
