"""`pipeline sweep sweep=<name>`: train every point of a scaling grid, then fit and plot.

Each point is one training run (a child MLflow run of the sweep's parent run) recording N (total and
non-embedding), D, C, its compute budget and the final validation loss. The fits, intervals, predictions
and plots go to the parent run.

One process trains the whole grid in turn; with sweep.point=i it trains only point i, so that Hydra multirun
(`pipeline sweep -m sweep=isoflop_tiny 'sweep.point=range(15)'`, locally or with a Slurm launcher) runs
every point as its own job. The points of one grid share the sweep id (a fingerprint of what they train) and
so the parent run, and the job that completes the grid fits it.

With sweep.branches (and train.schedule=wsd) the points of one model size share a run: the longest point
trains from step 0 and saves a checkpoint at the decay start of every shorter point; each shorter point is a
decay branch that forks that checkpoint (pipeline.checkpoint.layout.fork_checkpoint) and trains only its
decay. Before its decay starts a WSD schedule does not depend on the run's length, so a branch computes
exactly what a separate WSD run of its length would, at a fraction of the compute (`C_spent` per point;
the parent run logs the sweep's total against separate runs').
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import time
from pathlib import Path

from pipeline.checkpoint.layout import checkpoint_root
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
    lr: float | None = None  # the point's peak learning rate (None: train.lr)
    warmup: int | None = None  # warm-up steps (None: a tenth of the run)
    branch_from: int | None = None  # with sweep.branches: the step at which it forks its size's longest run

    @property
    def compute(self) -> float:
        return 6.0 * self.n_params * self.tokens

    @property
    def key(self) -> tuple:
        """Points of one model size and learning rate share a trunk under sweep.branches."""
        return dataclasses.astuple(self.model), self.lr


def _targets(cfg: PipelineConfig, n_params: int) -> list[tuple[float | None, float]]:
    sweep = cfg.sweep
    if sweep.kind == "isoflop":
        return [(C, C / (6 * n_params)) for C in sweep.budgets_flops]
    return [(None, float(t)) for t in sweep.tokens]


def plan_points(cfg: PipelineConfig, vocab_size: int) -> list[SweepPoint]:
    from pipeline.model.size import count_parameters

    sweep, batch_tokens = cfg.sweep, cfg.train.global_batch_tokens
    rows = ([(r.d_model, [(r.budget_flops, float(r.tokens))], r.lr) for r in sweep.runs] if sweep.kind == "points"
            else [(d, None, None) for d in sweep.d_models])
    points = []
    for d_model, targets, lr in rows:
        model = dataclasses.replace(shape_for_width(cfg.model, d_model, sweep), vocab_size=vocab_size)
        counts = count_parameters(model)
        for budget, tokens in targets or _targets(cfg, counts.total):
            steps = max(1, round(tokens / batch_tokens))
            points.append(SweepPoint(model, counts.total, counts.non_embedding, budget, steps, steps * batch_tokens,
                                     lr=lr))
    if sweep.branches:
        points = with_branches(points, cfg.train.decay_fraction)
    return sorted(points, key=lambda p: (p.budget or 0, p.n_params, p.tokens))


def default_warmup(steps: int) -> int:
    return min(max(1, steps // 10), steps - 1)


def with_branches(points: list[SweepPoint], decay_fraction: float) -> list[SweepPoint]:
    """The points with their WSD branch steps: within each model size the longest point is the trunk, every
    shorter one forks it at its own decay start; all share the shortest point's warm-up (a branch must see the
    trunk's schedule up to the fork)."""
    from pipeline.config import wsd_decay_start

    out = []
    for key in dict.fromkeys(p.key for p in points):
        group = sorted((p for p in points if p.key == key), key=lambda p: p.steps)
        warmup = default_warmup(group[0].steps)
        for p in group:
            fork = wsd_decay_start(p.steps, decay_fraction) if p.steps < group[-1].steps else None
            out.append(dataclasses.replace(p, warmup=warmup, branch_from=fork))
    return out


def trunk_of(point: SweepPoint, points: list[SweepPoint]) -> SweepPoint:
    """The longest point of a branch's model size: the run it forks."""
    return max((p for p in points if p.key == point.key), key=lambda p: p.steps)


def point_config(cfg: PipelineConfig, point: SweepPoint, sweep_id: str, save_at: list[int] | None = None) -> PipelineConfig:
    warmup = default_warmup(point.steps) if point.warmup is None else point.warmup
    train = dataclasses.replace(cfg.train, max_steps=point.steps, warmup_steps=warmup, resume="auto",
                                lr=cfg.train.lr if point.lr is None else point.lr)
    if save_at:  # a trunk keeps the checkpoints its branches fork
        train = dataclasses.replace(train, save_at_steps=sorted(set(save_at)), keep_last_checkpoints=0)
    budget = f"C{point.budget:.0e}" if point.budget else f"D{point.tokens}"
    lr = "" if point.lr is None else f"-lr{point.lr:.2g}"
    return dataclasses.replace(cfg, model=point.model, train=train,
                               run_name=f"{sweep_id}-{budget}-{point.model.name}{lr}".replace("+", ""))


def sweep_id_of(cfg: PipelineConfig, points: list[SweepPoint]) -> str:
    """Named by what the grid trains, so that running the same sweep again (or its points as separate jobs)
    reuses the runs that finished (train.resume=auto) and the same parent run."""
    # lr, warmup and branch_from only when set: sweeps planned before they existed keep their ids (and runs).
    described = [dataclasses.asdict(p.model) | {"steps": p.steps} | {
        k: v for k, v in (("lr", p.lr), ("warmup", p.warmup), ("branch_from", p.branch_from)) if v is not None}
        for p in points]
    return f"{cfg.sweep.name}-{fingerprint(described, 8)}"


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


def branch_steps(point: SweepPoint, points: list[SweepPoint]) -> list[int]:
    """For a trunk (a size's longest point under sweep.branches): the steps its branches fork at."""
    if point.branch_from is not None:
        return []
    return sorted({p.branch_from for p in points if p.key == point.key and p.branch_from is not None})


def spent_compute(point: SweepPoint, batch_tokens: int) -> float:
    """The FLOPs (6 N D) this point adds to the sweep: all its tokens, or a branch's decay only."""
    steps = point.steps - (point.branch_from or 0)
    return 6.0 * point.n_params * steps * batch_tokens


def train_point(cfg: PipelineConfig, data_dir: Path, point: SweepPoint, sweep_id: str, parent_run_id: str,
                points: list[SweepPoint] | None = None) -> float:
    """Train and evaluate one point as a child run of the sweep; record N, D, C, the epochs over the training
    split and the final loss on it. A WSD branch first forks its trunk's checkpoint (the trunk trains first)."""
    from data_prep.blend import open_split
    from pipeline.checkpoint.layout import tag_for
    from pipeline.config import run_dir_for
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.tracking import Tracker
    from pipeline.train.driver import train

    points = points or [point]
    child = point_config(cfg, point, sweep_id, save_at=branch_steps(point, points))
    tags = {"sweep_id": sweep_id, "mlflow.parentRunId": parent_run_id}
    if point.branch_from is not None:
        trunk_dir = run_dir_for(point_config(cfg, trunk_of(point, points), sweep_id))
        fork_branch(child, checkpoint_root(trunk_dir) / tag_for(point.branch_from))
        tags |= {"wsd_branch_of": trunk_dir.name, "wsd_branch_from_step": str(point.branch_from)}
    train(child, data_dir, tags=tags)
    metrics = evaluate(child, data_dir)
    record = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(child), child.run_name)
    # The epochs the loader counted at the last step (passes over the training windows), or the same count
    # from the point's tokens where the run logged none.
    logged = record.client.get_metric_history(record.run_id, "data_epochs")
    epochs = (max(logged, key=lambda m: m.step).value if logged
              else point.tokens / cfg.model.context_length / len(open_split(data_dir, "train")))
    record.log({"N": point.n_params, "N_nonembedding": point.n_nonembedding, "D": point.tokens,
                "C": point.compute, "C_budget": point.budget or point.compute,
                "C_spent": spent_compute(point, cfg.train.global_batch_tokens), "epochs": epochs,
                "final_val_loss": metrics["val_loss"]}, step=point.steps)
    record.close()
    return metrics["val_loss"]


def fork_branch(child: PipelineConfig, trunk_tag: Path) -> None:
    """A WSD branch's first checkpoint: its trunk's tag forked into the branch's run, unless the branch has
    checkpoints of its own (a resumed sweep). With an object store the trunk's tag is pulled whole first (this
    node holds only its own ranks' files of it) and the fork pushed, for the branch's nodes that lack it."""
    from pipeline.checkpoint.layout import complete_tags, fork_checkpoint
    from pipeline.checkpoint.store_sync import pull_checkpoint, pull_latest_checkpoint, push_checkpoint
    from pipeline.cluster.storage import mirror_for
    from pipeline.config import run_dir_for

    mirror, run_dir = mirror_for(child), run_dir_for(child)
    pull_latest_checkpoint(mirror, run_dir)
    if complete_tags(checkpoint_root(run_dir)):
        return
    pull_checkpoint(mirror, trunk_tag)
    push_checkpoint(mirror, fork_checkpoint(trunk_tag, run_dir))


def finished_points(cfg: PipelineConfig, sweep_id: str) -> int:
    from pipeline.scaling.gather import gather_points
    from pipeline.tracking import tracking_uri

    with contextlib.suppress(ValueError):  # none finished yet
        return len(gather_points(tracking_uri(cfg.tracking, cfg.output_dir), sweep_id))
    return 0


def training_order(points: list[SweepPoint], chosen) -> list[int]:
    """The chosen points' indices with every WSD trunk before the branches that fork it."""
    return sorted(chosen, key=lambda i: points[i].branch_from is not None)


def run_sweep(cfg: PipelineConfig) -> dict:
    from data_prep.blend import load_data_info
    from pipeline.config import validate, validate_sweep
    from pipeline.stages import prepare_stage
    from pipeline.tracking import ui_command

    validate_sweep(cfg.sweep, cfg.train)
    data_dir = prepare_stage(cfg)
    vocab = load_data_info(data_dir).vocab_size
    points = plan_points(cfg, vocab)
    for point in points:  # every point's config is checked before the first one trains
        validate(point_config(cfg, point, "check", save_at=branch_steps(point, points)))
    sweep_id = sweep_id_of(cfg, points)
    parent = open_parent(cfg, sweep_id, points)
    chosen = range(len(points)) if cfg.sweep.point is None else [cfg.sweep.point]
    log.info("sweep %s: %d runs%s", sweep_id, len(points),
             "" if cfg.sweep.point is None else f"; this job trains point {cfg.sweep.point}")
    started = time.time()
    for i in training_order(points, chosen):
        point = points[i]
        branch = "" if point.branch_from is None else f", a WSD branch from step {point.branch_from}"
        log.info("sweep point %d (of 0..%d): %s, N=%d, D=%d tokens (%d steps%s), C=%.3g", i, len(points) - 1,
                 point_config(cfg, point, sweep_id).run_name, point.n_params, point.tokens, point.steps, branch,
                 point.compute)
        train_point(cfg, data_dir, point, sweep_id, parent.run_id, points)
    log.info("sweep trained %d run(s) in %.0f s", len(chosen), time.time() - started)
    done = finished_points(cfg, sweep_id)
    if done < len(points):
        print(f"Sweep {sweep_id}: {done} of {len(points)} points finished; the job that finishes the last one fits "
              f"the grid (or run `pipeline scaling fit sweep={sweep_id}` on what is there).")
        return {"sweep_id": sweep_id, "finished_points": done}
    batch = cfg.train.global_batch_tokens
    parent.log({"sweep_compute_flops": sum(spent_compute(p, batch) for p in points),
                "separate_runs_compute_flops": sum(p.compute for p in points)}, step=0)
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
    """The fit report as flat MLflow metrics: approach 3's parameters, approaches 1 and 2's and Kaplan's
    exponents, the data-constrained fit's parameters, the compute-optimal predictions, each with its interval
    (`_lo`, `_hi`) where the report has one, and the number of diagnostics (warnings, also a tag)."""
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
    if "error" not in a2:  # the bootstrap's interval where it has one, else the regression's
        _with_interval(metrics, "approach2_a", a2["a"], a2.get("a_bootstrap_interval") or a2["a_interval"])
        _with_interval(metrics, "approach2_b", a2["b"], a2.get("b_bootstrap_interval") or a2["b_interval"])
    a1 = report.get("approach1", {})
    if a1 and "error" not in a1:
        _with_interval(metrics, "approach1_a", a1["a"], a1.get("a_interval"))
        _with_interval(metrics, "approach1_b", a1["b"], a1.get("b_interval"))
    constrained = report.get("data_constrained", {})
    if constrained and not {"error", "skipped"} & set(constrained):
        for k in ("E", "A", "B", "alpha", "beta", "R_star_D"):
            metrics[f"data_constrained_{k}"] = constrained[k]
    metrics["fit_diagnostics"] = float(len(report.get("diagnostics", [])))
    kaplan = report.get("kaplan", {})
    if "error" not in kaplan:
        _with_interval(metrics, "kaplan_alpha_N", kaplan["alpha_N"], kaplan["alpha_N_interval"])
        _with_interval(metrics, "kaplan_alpha_C", kaplan["alpha_C"], kaplan["alpha_C_interval"])
    return {k: v for k, v in metrics.items() if v is not None}


def log_fit(tracker, report: dict, out_dir: Path) -> None:
    """The report's numbers as metrics, its diagnostics as a tag, and the report, points and plots as
    artifacts under scaling/ of the run; closes the run."""
    tracker.log(report_metrics(report), step=0)
    if report.get("diagnostics"):
        tracker.set_tags({"scaling_diagnostics": "\n".join(report["diagnostics"])[:5000]})
    for name in ["scaling_fit.json", "points.csv", *report["plots"]]:
        tracker.log_artifact(out_dir / name, "scaling")
    tracker.close()


def fit_sweep(cfg: PipelineConfig, sweep_id: str) -> dict:
    """Gather the sweep's runs from MLflow, fit, and log the report and plots to the parent run."""
    from pipeline.cluster.storage import mirror_for
    from pipeline.scaling.fit_files import publish_fit
    from pipeline.scaling.gather import gather_curves, gather_points, parent_run
    from pipeline.scaling.report import summary, write_report
    from pipeline.tracking import Tracker, tracking_uri

    uri = tracking_uri(cfg.tracking, cfg.output_dir)
    points = gather_points(uri, sweep_id)
    out_dir = Path(cfg.output_dir) / "scaling" / sweep_id
    report = write_report(points, out_dir, list(cfg.sweep.predict_flops), n_bootstrap=cfg.sweep.n_bootstrap,
                          curves=gather_curves(uri, sweep_id), bootstrap_starts=cfg.sweep.bootstrap_starts)
    publish_fit(out_dir, mirror_for(cfg))
    parent = Tracker(uri, parent_run(uri, sweep_id))
    parent.client.update_run(parent.run_id, status="RUNNING")
    log_fit(parent, report, out_dir)
    print(summary(report))
    print(f"Fit report: {out_dir / 'scaling_fit.json'}")
    return report

