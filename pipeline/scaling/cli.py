"""`pipeline scaling fit|predict`: fit a sweep's runs (from MLflow or a CSV); predict at a compute budget.

    pipeline scaling fit sweep=<sweep id or parent run id> [output_dir=outputs] [C=1e21 ...]
    pipeline scaling fit csv=points.csv [C=1e21 ...]
    pipeline scaling predict C=1e21 [fit=outputs/scaling/<sweep id>/scaling_fit.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _parse(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"error: expected key=value, got {arg!r}\n{__doc__}")
        key, value = arg.split("=", 1)
        out.setdefault(key, []).append(value)
    return out


def _fit(args: dict[str, list[str]]) -> int:
    from pipeline.config import SweepConfig, TrackingConfig
    from pipeline.scaling.fit import load_points_csv
    from pipeline.scaling.report import summary, write_report

    output_dir = Path(args.get("output_dir", ["outputs"])[0]).resolve()
    budgets = [float(c) for c in args.get("C", [])] or SweepConfig().predict_flops
    if "csv" in args:
        points = load_points_csv(args["csv"][0])
        out_dir = output_dir / "scaling" / Path(args["csv"][0]).stem
        report = write_report(points, out_dir, budgets)
        (output_dir / "scaling" / "latest").write_text(out_dir.name)
        print(summary(report))
        print(f"Fit report: {out_dir / 'scaling_fit.json'}")
        return 0
    if "sweep" not in args:
        raise SystemExit(f"error: give sweep=<id> or csv=<path>\n{__doc__}")
    from pipeline.config import PipelineConfig
    from pipeline.scaling.sweep import fit_sweep

    uri = args.get("tracking_uri", [None])[0]
    cfg = PipelineConfig(output_dir=str(output_dir), tracking=TrackingConfig(uri=uri),
                         sweep=SweepConfig(predict_flops=budgets))
    fit_sweep(cfg, args["sweep"][0])
    return 0


def _interval(intervals: dict, key: str) -> str:
    return f" [{intervals[key][0]:.3g}, {intervals[key][1]:.3g}]" if intervals else ""


def _predict(args: dict[str, list[str]]) -> int:
    from pipeline.scaling.fit import ChinchillaFit, compute_optimal_interval

    if "C" not in args:
        raise SystemExit(f"error: give C=<FLOPs>\n{__doc__}")
    if "fit" in args:
        path = Path(args["fit"][0])
    else:
        scaling = Path(args.get("output_dir", ["outputs"])[0]) / "scaling"
        if not (scaling / "latest").is_file():
            raise SystemExit(f"error: no fit under {scaling}: run `pipeline scaling fit` or pass fit=<json>")
        path = scaling / (scaling / "latest").read_text().strip() / "scaling_fit.json"
    a3 = json.loads(path.read_text()).get("approach3", {})
    if "error" in a3 or not a3:
        raise SystemExit(f"error: {path} holds no approach-3 fit ({a3.get('error')})")
    fit = ChinchillaFit(E=a3["E"], A=a3["A"], B=a3["B"], alpha=a3["alpha"], beta=a3["beta"], objective=a3["objective"],
                        n_points=a3["n_points"], confidence=a3["confidence"])
    fit.bootstrap_params = json.loads(path.read_text()).get("bootstrap_params", [])
    for c in args["C"]:
        C = float(c)
        n_opt, d_opt, loss = fit.compute_optimal(C)
        iv = compute_optimal_interval(fit, C)
        print(f"C={C:.3g} FLOPs: N_opt={n_opt:.3g}{_interval(iv, 'N_opt')} params, "
              f"D_opt={d_opt:.3g}{_interval(iv, 'D_opt')} tokens, loss={loss:.4f}{_interval(iv, 'loss')}  (fit: {path})")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fit", "predict"):
        print(__doc__, file=sys.stderr)
        return 2
    args = _parse(argv[1:])
    return _fit(args) if argv[0] == "fit" else _predict(args)
