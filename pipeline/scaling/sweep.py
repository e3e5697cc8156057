"""`pipeline sweep sweep=<name>`: train every point of a scaling grid, then fit and plot.

Each point is one training run (a child MLflow run of the sweep's parent run) recording N (total and
non-embedding), D, C, its compute budget and the final validation loss. The fits, intervals, predictions
and plots go to the parent run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pipeline.config import ModelConfig, PipelineConfig, SweepConfig, fingerprint

log = logging.getLogger(__name__)


def shape_for_width(base: ModelConfig, d_model: int, sweep: SweepConfig) -> ModelConfig:
    """The shape rule (pipeline.scaling.shapes): depth grows with width at a fixed aspect ratio, heads of a
    fixed size, d_ff = 4 d."""
    from pipeline.scaling.shapes import shape_from_width

    return dataclasses.replace(base, name=f"d{d_model}", **shape_from_width(d_model, sweep.aspect_ratio, sweep.head_dim))


@dataclasses.dataclass
class SweepPoint:
    model: ModelConfig
    n_params: int
    n_nonembedding: int
    budget: float | None  # the IsoFLOP budget this point belongs to (None for a plain grid)
    steps: int
    tokens: int

    @property
    def compute(self) -> float:
        return 6.0 * self.n_params * self.tokens


def plan_points(cfg: PipelineConfig, vocab_size: int) -> list[SweepPoint]:
    from pipeline.model_size import count_parameters

    sweep, batch_tokens = cfg.sweep, cfg.train.global_batch_tokens
    points = []
    for d_model in sweep.d_models:
        model = dataclasses.replace(shape_for_width(cfg.model, d_model, sweep), vocab_size=vocab_size)
        counts = count_parameters(model)
        targets = ([(C, C / (6 * counts.total)) for C in sweep.budgets_flops] if sweep.kind == "isoflop"
                   else [(None, float(t)) for t in sweep.tokens])
        for budget, tokens in targets:
            steps = max(1, round(tokens / batch_tokens))
            points.append(SweepPoint(model, counts.total, counts.non_embedding, budget, steps, steps * batch_tokens))
    return sorted(points, key=lambda p: (p.budget or 0, p.n_params, p.tokens))


def point_config(cfg: PipelineConfig, point: SweepPoint, sweep_id: str) -> PipelineConfig:
    warmup = min(max(1, point.steps // 10), point.steps - 1)
    train = dataclasses.replace(cfg.train, max_steps=point.steps, warmup_steps=warmup, resume="auto")
    budget = f"C{point.budget:.0e}" if point.budget else f"D{point.tokens}"
    return dataclasses.replace(cfg, model=point.model, train=train,
                               run_name=f"{sweep_id}-{budget}-{point.model.name}".replace("+", ""))


def run_sweep(cfg: PipelineConfig) -> dict:
    from data_prep.shards import load_manifest
    from pipeline.config import validate, validate_sweep
    from pipeline.evaluate import evaluate
    from pipeline.stages import prepare_stage
    from pipeline.tracking import Tracker, ui_command
    from pipeline.train import train

    validate_sweep(cfg.sweep)
    data_dir = prepare_stage(cfg)
    vocab = load_manifest(data_dir).vocab_size
    points = plan_points(cfg, vocab)
    for point in points:  # every point's config is checked before the first one trains
        validate(point_config(cfg, point, "check"))
    # Named by what it trains, so that running the same sweep again reuses the runs that finished
    # (train.resume=auto) instead of starting over.
    sweep_id = f"{cfg.sweep.name}-{fingerprint([dataclasses.asdict(p.model) | {'steps': p.steps} for p in points], 8)}"
    parent_dir = Path(cfg.output_dir) / "sweeps" / sweep_id
    parent = Tracker.open(cfg.tracking, cfg.output_dir, parent_dir, sweep_id, tags={"sweep_id": sweep_id})
    parent.log_params({"sweep.name": cfg.sweep.name, "sweep.kind": cfg.sweep.kind, "sweep.points": len(points),
                       "sweep.d_models": cfg.sweep.d_models, "sweep.budgets_flops": cfg.sweep.budgets_flops})
    log.info("sweep %s: %d runs", sweep_id, len(points))
    started = time.time()
    for i, point in enumerate(points, 1):
        child = point_config(cfg, point, sweep_id)
        log.info("sweep point %d/%d: %s, N=%d, D=%d tokens (%d steps), C=%.3g", i, len(points), child.run_name,
                 point.n_params, point.tokens, point.steps, point.compute)
        tags = {"sweep_id": sweep_id, "mlflow.parentRunId": parent.run_id}
        train(child, data_dir, tags=tags)
        metrics = evaluate(child, data_dir)
        record = Tracker.open(cfg.tracking, cfg.output_dir, Path(cfg.output_dir) / "runs" / child.run_name,
                              child.run_name)
        record.log({"N": point.n_params, "N_nonembedding": point.n_nonembedding, "D": point.tokens,
                    "C": point.compute, "C_budget": point.budget or point.compute,
                    "final_val_loss": metrics["val_loss"]}, step=point.steps)
        record.close()
    log.info("sweep trained %d runs in %.0f s", len(points), time.time() - started)
    parent.close()
    report = fit_sweep(cfg, sweep_id)
    print(f"Sweep {sweep_id}: parent MLflow run {parent.run_id}. Open with: "
          f"{ui_command(parent.uri)}")
    return report


def fit_sweep(cfg: PipelineConfig, sweep_id: str) -> dict:
    """Gather the sweep's runs from MLflow, fit, and log the report and plots to the parent run."""
    from pipeline.scaling.gather import gather_points, parent_run
    from pipeline.scaling.report import summary, write_report
    from pipeline.tracking import Tracker, tracking_uri

    uri = tracking_uri(cfg.tracking, cfg.output_dir)
    points = gather_points(uri, sweep_id)
    out_dir = Path(cfg.output_dir) / "scaling" / sweep_id
    report = write_report(points, out_dir, list(cfg.sweep.predict_flops), n_bootstrap=cfg.sweep.n_bootstrap)
    (Path(cfg.output_dir) / "scaling" / "latest").write_text(sweep_id)
    parent = Tracker(uri, parent_run(uri, sweep_id))
    parent.client.update_run(parent.run_id, status="RUNNING")
    metrics = {}
    a3 = report.get("approach3", {})
    if "error" not in a3:
        metrics.update({f"fit_{k}": a3[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")})
        for name, (lo, hi) in a3["intervals"].items():
            metrics[f"fit_{name}_lo"], metrics[f"fit_{name}_hi"] = lo, hi
        for p in report.get("predictions", []):
            tag = f"{p['C']:.3g}".replace("+", "")
            metrics.update({f"pred_N_opt_C{tag}": p["N_opt"], f"pred_D_opt_C{tag}": p["D_opt"],
                            f"pred_loss_C{tag}": p["loss"]})
    a2 = report.get("approach2", {})
    if "error" not in a2:
        metrics.update({"approach2_a": a2["a"], "approach2_b": a2["b"]})
    parent.log(metrics, step=0)
    for name in ["scaling_fit.json", "points.csv", *report["plots"]]:
        parent.log_artifact(out_dir / name, "scaling")
    parent.close()
    print(summary(report))
    print(f"Fit report: {out_dir / 'scaling_fit.json'}")
    return report

