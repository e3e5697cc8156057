"""`pipeline scaling fit|predict|plan|recommend|validate`: fit a sweep; plan one; turn a fit into a run.

    pipeline scaling fit sweep=<sweep id or parent run id> [output_dir=outputs] [C=1e21 ...]
    pipeline scaling fit csv=points.csv [C=1e21 ...]            (also logged to MLflow as a run)
        [n_bootstrap=200] [bootstrap_starts=24|all]    (approach 3's grid starts per bootstrap replicate)
    pipeline scaling predict C=1e21 [fit=outputs/scaling/<sweep id>/scaling_fit.json]
    pipeline scaling plan C_min=1e10 C_max=1e11 [budgets=3 | C=1e10 C=3e10 ...] [prior=chinchilla|epoch|latest|<json>]
                          [sizes=5] [span=1.0] [name=plan] [branches=true] [mfu=0.3] [peak_tflops=T] [overhead_s=30]
                          [Hydra overrides, e.g. sweep=isoflop_tiny model.mup_base_width=8]
    pipeline scaling recommend C=<FLOPs> [fit=latest|<json>] [base_width=<d>] [Hydra overrides]
    pipeline scaling validate C=<FLOPs> [fit=latest|<json>] [base_width=<d>] [Hydra overrides]

plan writes <output_dir>/scaling/configs/sweep/<name>.yaml and recommend .../recommended/<name>.yaml; both print
the command that runs them (`--config-dir <output_dir>/scaling/configs`). validate trains the recommended
model, scores it and logs predicted against measured loss to the sweep's parent run.
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
    from pipeline.scaling.fit_inputs import load_points_csv
    from pipeline.scaling.report import summary, write_report

    output_dir = Path(args.get("output_dir", ["outputs"])[0]).resolve()
    budgets = [float(c) for c in args.get("C", [])] or SweepConfig().predict_flops
    starts = args.get("bootstrap_starts", [str(SweepConfig().bootstrap_starts)])[-1]
    starts = None if starts in ("all", "null", "None") else int(starts)
    n_bootstrap = int(args.get("n_bootstrap", [str(SweepConfig().n_bootstrap)])[-1])
    if "csv" in args:
        from pipeline.scaling.fit_files import publish_fit
        from pipeline.scaling.sweep import log_fit
        from pipeline.tracking import Tracker, ui_command

        points = load_points_csv(args["csv"][0])
        out_dir = output_dir / "scaling" / Path(args["csv"][0]).stem
        report = write_report(points, out_dir, budgets, n_bootstrap=n_bootstrap, bootstrap_starts=starts)
        publish_fit(out_dir)
        # A run of its own, named and tagged like a sweep's parent, so that `scaling validate` finds it too.
        tracking = TrackingConfig(uri=args.get("tracking_uri", [None])[0])
        run = Tracker.open(tracking, output_dir, out_dir, out_dir.name,
                           tags={"sweep_id": out_dir.name, "scaling_fit": "csv"})
        run.log_params({"csv": str(Path(args["csv"][0]).resolve()), "n_points": len(points)})
        log_fit(run, report, out_dir)
        print(summary(report))
        print(f"Fit report: {out_dir / 'scaling_fit.json'}\nMLflow run {run.run_id}: {ui_command(run.uri)}")
        return 0
    if "sweep" not in args:
        raise SystemExit(f"error: give sweep=<id> or csv=<path>\n{__doc__}")
    from pipeline.config import PipelineConfig
    from pipeline.scaling.sweep import fit_sweep

    uri = args.get("tracking_uri", [None])[0]
    cfg = PipelineConfig(output_dir=str(output_dir), tracking=TrackingConfig(uri=uri),
                         sweep=SweepConfig(predict_flops=budgets, n_bootstrap=n_bootstrap, bootstrap_starts=starts))
    fit_sweep(cfg, args["sweep"][0])
    return 0


def _interval(intervals: dict, key: str) -> str:
    return f" [{intervals[key][0]:.3g}, {intervals[key][1]:.3g}]" if intervals else ""


def _predict(args: dict[str, list[str]]) -> int:
    from pipeline.scaling.approach3 import ChinchillaFit, compute_optimal_interval
    from pipeline.scaling.fit_files import fit_file

    if "C" not in args:
        raise SystemExit(f"error: give C=<FLOPs>\n{__doc__}")
    try:
        path = fit_file(args.get("fit", ["latest"])[0], args.get("output_dir", ["outputs"])[0])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if not path.is_file():
        raise SystemExit(f"error: {path} is not a file: pass fit=<a scaling_fit.json of `pipeline scaling fit`>")
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
    commands = {"fit": _fit, "predict": _predict}
    if argv and argv[0] in ("plan", "recommend", "validate"):
        from pipeline.scaling.commands import main as commands_main

        return commands_main(argv[0], argv[1:])
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]](_parse(argv[1:]))
