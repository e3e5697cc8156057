"""`pipeline sweep sweep=<name>`: train every point of a scaling grid, then fit and plot.

Each point is one training run (a child MLflow run of the sweep's parent run) recording N (total and
non-embedding), D, C, its compute budget and the final validation loss. The fits, intervals, predictions
and plots go to the parent run.

One process trains the whole grid in turn; with sweep.point=i it trains only point i, so that Hydra multirun
(`pipeline sweep -m sweep=isoflop_tiny 'sweep.point=range(15)'`, locally or with a Slurm launcher) runs
every point as its own job. The points of one grid share the sweep id (a fingerprint of what they train) and
so the parent run, and the job that completes the grid fits it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
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
    from pipeline.model.size import count_parameters

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


def sweep_id_of(cfg: PipelineConfig, points: list[SweepPoint]) -> str:
    """Named by what the grid trains, so that running the same sweep again (or its points as separate jobs)
    reuses the runs that finished (train.resume=auto) and the same parent run."""
    return f"{cfg.sweep.name}-{fingerprint([dataclasses.asdict(p.model) | {'steps': p.steps} for p in points], 8)}"


def open_parent(cfg: PipelineConfig, sweep_id: str, points: list[SweepPoint]):
    """The sweep's parent MLflow run, created once even when several point jobs start together."""
    from pipeline.tracking import Tracker

    parent_dir = Path(cfg.output_dir) / "sweeps" / sweep_id
    parent_dir.mkdir(parents=True, exist_ok=True)
    with open(parent_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        parent = Tracker.open(cfg.tracking, cfg.output_dir, parent_dir, sweep_id, tags={"sweep_id": sweep_id})
        parent.log_params({"sweep.name": cfg.sweep.name, "sweep.kind": cfg.sweep.kind, "sweep.points": len(points),
                           "sweep.d_models": cfg.sweep.d_models, "sweep.budgets_flops": cfg.sweep.budgets_flops})
    return parent


def train_point(cfg: PipelineConfig, data_dir: Path, point: SweepPoint, sweep_id: str, parent_run_id: str) -> float:
    """Train and evaluate one point as a child run of the sweep; record N, D, C and the final loss on it."""
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.tracking import Tracker
    from pipeline.train.driver import train

    child = point_config(cfg, point, sweep_id)
    train(child, data_dir, tags={"sweep_id": sweep_id, "mlflow.parentRunId": parent_run_id})
    metrics = evaluate(child, data_dir)
    record = Tracker.open(cfg.tracking, cfg.output_dir, Path(cfg.output_dir) / "runs" / child.run_name, child.run_name)
    record.log({"N": point.n_params, "N_nonembedding": point.n_nonembedding, "D": point.tokens,
                "C": point.compute, "C_budget": point.budget or point.compute,
                "final_val_loss": metrics["val_loss"]}, step=point.steps)
    record.close()
    return metrics["val_loss"]


def finished_points(cfg: PipelineConfig, sweep_id: str) -> int:
    from pipeline.scaling.gather import gather_points
    from pipeline.tracking import tracking_uri

    with contextlib.suppress(ValueError):  # none finished yet
        return len(gather_points(tracking_uri(cfg.tracking, cfg.output_dir), sweep_id))
    return 0


def run_sweep(cfg: PipelineConfig) -> dict:
    from data_prep.blend import load_data_info
    from pipeline.config import validate, validate_sweep
    from pipeline.stages import prepare_stage
    from pipeline.tracking import ui_command

    validate_sweep(cfg.sweep)
    data_dir = prepare_stage(cfg)
    vocab = load_data_info(data_dir).vocab_size
    points = plan_points(cfg, vocab)
    for point in points:  # every point's config is checked before the first one trains
        validate(point_config(cfg, point, "check"))
    sweep_id = sweep_id_of(cfg, points)
    parent = open_parent(cfg, sweep_id, points)
    chosen = range(len(points)) if cfg.sweep.point is None else [cfg.sweep.point]
    log.info("sweep %s: %d runs%s", sweep_id, len(points),
             "" if cfg.sweep.point is None else f"; this job trains point {cfg.sweep.point}")
    started = time.time()
    for i in chosen:
        point = points[i]
        log.info("sweep point %d (of 0..%d): %s, N=%d, D=%d tokens (%d steps), C=%.3g", i, len(points) - 1,
                 point_config(cfg, point, sweep_id).run_name, point.n_params, point.tokens, point.steps, point.compute)
        train_point(cfg, data_dir, point, sweep_id, parent.run_id)
    log.info("sweep trained %d run(s) in %.0f s", len(chosen), time.time() - started)
    done = finished_points(cfg, sweep_id)
    if done < len(points):
        print(f"Sweep {sweep_id}: {done} of {len(points)} points finished; the job that finishes the last one fits "
              f"the grid (or run `pipeline scaling fit sweep={sweep_id}` on what is there).")
        return {"sweep_id": sweep_id, "finished_points": done}
    parent.close()
    report = fit_sweep(cfg, sweep_id)
    print(f"Sweep {sweep_id}: parent MLflow run {parent.run_id}. Open with: "
          f"{ui_command(parent.uri)}")
    return report


def _with_interval(metrics: dict, name: str, value, interval) -> None:
    metrics[name] = value
    if interval:
        metrics[f"{name}_lo"], metrics[f"{name}_hi"] = interval


def report_metrics(report: dict) -> dict[str, float]:
    """The fit report as flat MLflow metrics: approach 3's parameters, approach 2's and Kaplan's exponents,
    the compute-optimal predictions, each with its interval (`_lo`, `_hi`) where the report has one."""
    metrics: dict[str, float] = {}
    a3 = report.get("approach3", {})
    if "error" not in a3:
        for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
            _with_interval(metrics, f"fit_{k}", a3[k], a3["intervals"].get(k))
        for p in report.get("predictions", []):
            tag = f"{p['C']:.3g}".replace("+", "")
            for key, name in (("N_opt", "N_opt"), ("D_opt", "D_opt"), ("loss", "loss")):
                _with_interval(metrics, f"pred_{name}_C{tag}", p[key], p["intervals"].get(key))
    a2 = report.get("approach2", {})
    if "error" not in a2:
        _with_interval(metrics, "approach2_a", a2["a"], a2["a_interval"])
        _with_interval(metrics, "approach2_b", a2["b"], a2["b_interval"])
    kaplan = report.get("kaplan", {})
    if "error" not in kaplan:
        _with_interval(metrics, "kaplan_alpha_N", kaplan["alpha_N"], kaplan["alpha_N_interval"])
        _with_interval(metrics, "kaplan_alpha_C", kaplan["alpha_C"], kaplan["alpha_C_interval"])
    return {k: v for k, v in metrics.items() if v is not None}


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
    parent.log(report_metrics(report), step=0)
    for name in ["scaling_fit.json", "points.csv", *report["plots"]]:
        parent.log_artifact(out_dir / name, "scaling")
    parent.close()
    print(summary(report))
    print(f"Fit report: {out_dir / 'scaling_fit.json'}")
    return report

