"""`pipeline scaling plan`, `recommend` and `validate`: the commands that compose the user's Hydra config
(pipeline.scaling.cli dispatches to them and holds `fit` and `predict`).

Each takes its own key=value options (OPTIONS) and passes every other argument to Hydra as an override, so
that the sweep it plans or the model it recommends has the setting the user trains with (vocabulary,
context, batch, data, µP).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from pipeline.cluster.storage import mirror_for
from pipeline.config import ConfigError, PipelineConfig, PipelineError
from pipeline.redaction import redact_uri, scrub

log = logging.getLogger(__name__)

OPTIONS = {
    "plan": {"C", "C_min", "C_max", "budgets", "prior", "sizes", "span", "name", "branches", "mfu", "peak_tflops",
             "overhead_s", "gpu"},
    "recommend": {"C", "fit", "base_width"},
    "validate": {"C", "fit", "base_width"},
}


def split_arguments(command: str, argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(the command's own options, the Hydra overrides)."""
    options: dict[str, list[str]] = {}
    overrides = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key in OPTIONS[command]:
            options.setdefault(key, []).append(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    return options, overrides


def _one(options: dict[str, list[str]], key: str, default=None, kind=str):
    if key not in options:
        return default
    try:
        return kind(options[key][-1])
    except ValueError as err:
        raise ConfigError(f"{key}={options[key][-1]!r} is not a valid {kind.__name__}") from err


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def budgets_of(options: dict[str, list[str]]) -> list[float]:
    """C=... values, or `budgets` log-spaced values from C_min to C_max (FLOPs)."""
    if "C" in options:
        return sorted(float(c) for c in options["C"])
    if "C_min" not in options or "C_max" not in options:
        raise ConfigError("give the compute range: C_min=<FLOPs> C_max=<FLOPs> [budgets=3], or C=<FLOPs> per budget")
    lo, hi, n = _one(options, "C_min", kind=float), _one(options, "C_max", kind=float), _one(options, "budgets", 3, int)
    if not 0 < lo < hi or n < 2:
        raise ConfigError(f"C_min={lo:g} must be positive and below C_max={hi:g}, with budgets={n} >= 2")
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _compose(overrides: list[str]) -> PipelineConfig:
    from pipeline.compose import compose_config

    return compose_config(overrides, stage="params")


def plan_command(options: dict[str, list[str]], overrides: list[str]) -> int:
    from pipeline.scaling.sweep_plan import (
        config_dir_of,
        estimate_seconds,
        load_fit,
        plan_grid,
        vocab_of,
        write_sweep_config,
    )

    cfg = _compose(overrides)
    budgets = budgets_of(options)
    prior_name = _one(options, "prior", "chinchilla")
    prior, _ = load_fit(prior_name, cfg.output_dir, mirror_for(cfg))
    branches = _one(options, "branches", True, _bool)
    runs = plan_grid(cfg, prior, budgets, vocab_of(cfg), _one(options, "sizes", 5, int), _one(options, "span", 1.0, float))
    peak, mfu, peak_source = _throughput(cfg, options)
    seconds = estimate_seconds(cfg, runs, peak, mfu, _one(options, "overhead_s", 30.0, float), branches)
    name = _one(options, "name", f"plan_{budgets[0]:.0e}_{budgets[-1]:.0e}".replace("+", ""))
    lines = [f"IsoFLOP plan around the optimum of prior={prior_name} (sizes={_one(options, 'sizes', 5, int)}, "
             f"span={_one(options, 'span', 1.0, float)} decades of N; lr "
             + ("train.lr under µP)" if cfg.model.mup_base_width else "by the width rule lr * d_min / d)"),
             f"{'budget C':>10} {'N*(C)':>10} {'d_model':>7} {'n_layer':>7} {'N':>10} {'tokens':>12} {'steps':>7} {'lr':>9}"]
    for r in runs:
        lines.append(f"{r.budget:10.3g} {r.n_opt:10.3g} {r.width:7d} {max(1, round(r.width / cfg.sweep.aspect_ratio)):7d} "
                     f"{r.n_params:10,d} {r.tokens:12,d} {r.steps:7d} {r.lr:9.3g}")
    separate = sum(r.compute for r in runs)
    lines.append(f"{len(runs)} runs, {separate:.3g} FLOPs (6ND)"
                 + (f"; as WSD branches {_branch_compute(cfg, runs):.3g} FLOPs" if branches else ""))
    lines.append(f"estimated wall time: {seconds / 3600:.2f} h on {cfg.parallel.num_workers} worker(s) at "
                 f"{mfu:.0%} of {peak:.3g} TFLOP/s ({peak_source}) plus start-up per run")
    path = write_sweep_config(cfg, runs, name, branches, "\n".join(lines))
    print("\n".join(lines))
    extra = scrub(" ".join(o for o in overrides if not o.startswith(("sweep=", "output_dir="))))
    print(f"Sweep config: {path}\nRun it with: pipeline sweep --config-dir {config_dir_of(cfg)} sweep={name} "
          f"output_dir={cfg.output_dir} {extra}".rstrip())
    return 0


def _branch_compute(cfg: PipelineConfig, runs) -> float:
    from pipeline.scaling.sweep_plan import trained_steps

    return sum(6.0 * r.n_params * trained_steps(cfg, r, runs, True) * cfg.train.global_batch_tokens for r in runs)


def _throughput(cfg: PipelineConfig, options: dict[str, list[str]]) -> tuple[float, float, str]:
    """(peak TFLOP/s per worker, assumed MFU, where the peak comes from) for the wall-time estimate."""
    peak = _one(options, "peak_tflops", None, float) or cfg.train.peak_tflops
    gpu = _one(options, "gpu")
    if peak:
        source = "given"
    elif gpu:
        from pipeline.train.memory_plan import gpu_spec

        peak, source = gpu_spec(gpu)[1], f"{gpu} datasheet"
    else:
        import torch

        from pipeline.train.throughput import measure_peak_tflops

        peak, source = measure_peak_tflops("fp32", torch.device("cpu")), "an fp32 matmul measured here"
    return peak, _one(options, "mfu", 0.3, float), source


def recommend_command(options: dict[str, list[str]], overrides: list[str], train_it: bool = False) -> int:
    from pipeline.scaling.sweep_plan import (
        base_width_for,
        config_dir_of,
        load_fit,
        recommend,
        write_recommendation,
    )

    cfg = _compose(overrides)
    if "C" not in options:
        raise ConfigError("give the compute budget: C=<FLOPs>")
    fit_name = _one(options, "fit", "latest")
    fit, source = load_fit(fit_name, cfg.output_dir, mirror_for(cfg))
    points = json.loads(source.read_text()).get("points") if source else None
    base_width = _one(options, "base_width", None, int) or base_width_for(cfg, points)
    for c in options["C"]:
        rec = recommend(cfg, fit, float(c), base_width)
        path = write_recommendation(cfg, rec, str(source or f"the published {fit_name} fit"))
        print(rec.summary())
        print(f"Config: {path}\nTrain it with: pipeline train --config-dir {config_dir_of(cfg)} "
              f"+recommended={rec.model.name} output_dir={cfg.output_dir}")
        if train_it:
            validate_recommendation(cfg, rec, source)
    return 0


def validate_recommendation(cfg: PipelineConfig, rec, fit_path: Path | None) -> dict:
    """Train and score the recommended run; log predicted against measured loss (with the interval) to the
    sweep's parent run (the fit's directory names the sweep), and say whether it fell inside or by how much
    it missed."""
    from pipeline.config import validate
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.scaling.sweep_plan import recommended_config
    from pipeline.stages import prepare_stage
    from pipeline.train.driver import train

    run_cfg = dataclasses.replace(recommended_config(cfg, rec), run_name=f"validate-{rec.model.name}")
    run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, resume="auto"))
    validate(run_cfg)
    data_dir = prepare_stage(run_cfg)
    train(run_cfg, data_dir, tags={"scaling_validate": f"{rec.C:g}"})
    measured = evaluate(run_cfg, data_dir)["val_loss"]
    result = {"C": rec.C, "N": rec.n_params, "D": rec.tokens, "predicted_loss": rec.loss, "measured_loss": measured}
    if rec.loss_interval:
        lo, hi = rec.loss_interval
        result |= {"predicted_loss_lo": lo, "predicted_loss_hi": hi, "inside": float(lo <= measured <= hi),
                   "miss": 0.0 if lo <= measured <= hi else measured - (hi if measured > hi else lo)}
    _log_validation(cfg, result, fit_path)
    print(validation_summary(result))
    return result


def validation_summary(result: dict) -> str:
    head = (f"validation at C={result['C']:.3g}: N={result['N']:,} D={result['D']:,}: predicted loss "
            f"{result['predicted_loss']:.4f}")
    if "predicted_loss_lo" not in result:
        return head + f", measured {result['measured_loss']:.4f} (the fit has no bootstrap: no interval to judge by)"
    head += f" [{result['predicted_loss_lo']:.4f}, {result['predicted_loss_hi']:.4f}], measured {result['measured_loss']:.4f}"
    if result["inside"]:
        return head + ": inside the interval"
    side = "above" if result["miss"] > 0 else "below"
    return head + f": outside, {abs(result['miss']):.4f} nats ({abs(result['miss']) / result['measured_loss']:.1%}) {side} it"


def _log_validation(cfg: PipelineConfig, result: dict, fit_path: Path | None) -> None:
    from pipeline.scaling.gather import parent_run
    from pipeline.tracking import Tracker, tracking_uri

    uri = tracking_uri(cfg.tracking, cfg.output_dir)
    try:
        run_id = parent_run(uri, fit_path.parent.name) if fit_path is not None else None
    except ValueError:
        run_id = None
    if run_id is None:
        log.warning("the fit %s belongs to no sweep or fit run in %s: logging the validation to a run of its own",
                    fit_path, redact_uri(uri))
        tracker = Tracker.open(cfg.tracking, cfg.output_dir, Path(cfg.output_dir) / "scaling" / "validate",
                               "scaling-validate")
    else:
        tracker = Tracker(uri, run_id)
        tracker.client.update_run(run_id, status="RUNNING")
    tag = f"{result['C']:.3g}".replace("+", "")
    tracker.log({f"validate_C{tag}_{k}": float(v) for k, v in result.items() if k != "C" and math.isfinite(v)}, step=0)
    tracker.close()


def main(command: str, argv: list[str]) -> int:
    options, overrides = split_arguments(command, argv)
    try:
        if command == "plan":
            return plan_command(options, overrides)
        return recommend_command(options, overrides, train_it=command == "validate")
    except (PipelineError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
