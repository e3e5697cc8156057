"""sweep.*: a scaling-law sweep (isoflop, grid, or planned points), each point one training run."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.base import Choice, ConfigError, choice, non_negative, positive
from pipeline.config.train import TrainConfig


@dataclass
class SweepRun:
    """One planned run of a sweep.kind=points sweep (written by `pipeline scaling plan`)."""

    d_model: int
    tokens: int
    budget_flops: float | None = None
    # The run's peak learning rate (null: train.lr).
    lr: float | None = None


class SweepKind(Choice):
    isoflop = "isoflop"
    grid = "grid"
    points = "points"


@dataclass
class SweepConfig:
    """A scaling-law sweep: each point is one training run (see pipeline.scaling.sweep)."""

    name: str = "none"
    # isoflop: for each compute budget, every model size with D = C / (6 N) | grid: every size x token count |
    # points: the runs listed in sweep.runs (as `pipeline scaling plan` writes them)
    kind: SweepKind = SweepKind.isoflop
    runs: list[SweepRun] = field(default_factory=list)
    # One run per model size with a WSD schedule (train.schedule=wsd); each shorter token budget of that size is a
    # decay branch forked from the long run's stable phase at its decay start, instead of a run from step 0.
    branches: bool = False
    # The width at which train.lr holds under the learning-rate width rule lr(d) = train.lr * lr_base_width / d
    # (pipeline.scaling.sweep_plan; null: the smallest width planned). Unused under µP (model.mup_base_width).
    lr_base_width: int | None = None
    # Compute budgets in FLOPs (isoflop).
    budgets_flops: list[float] = field(default_factory=list)
    # Training tokens per run (grid).
    tokens: list[float] = field(default_factory=list)
    # Model sizes by width; depth and heads follow the shape rule below.
    d_models: list[int] = field(default_factory=list)
    # Shape rule: n_layer = max(1, round(d_model / aspect_ratio)), n_head = d_model / head_dim, d_ff = 4 d_model.
    aspect_ratio: int = 32
    head_dim: int = 16
    # Budgets (FLOPs) at which the fit predicts compute-optimal N, D and loss.
    predict_flops: list[float] = field(default_factory=lambda: [1e21, 5.76e23])
    n_bootstrap: int = 200
    # Approach 3's bootstrap: starts per replicate drawn from the whole initial grid, beside the full-data fit's
    # optima (pipeline.scaling.approach3; null: all 4,500, minutes). 24: Chinchilla's 245 runs in 10.5 s on 2 cores
    # with every interval within 0.1% of 300 starts' (64 s).
    bootstrap_starts: int | None = 24
    # Train only this point of the grid (0-based, in the order `pipeline sweep` logs them), so that Hydra
    # multirun runs each point as its own job: pipeline sweep -m sweep=isoflop_tiny 'sweep.point=range(15)'
    # (with hydra/launcher=pipeline_slurm, as Slurm jobs). The job that completes the grid fits it.
    point: int | None = None


def sweep_size(sweep: SweepConfig) -> int:
    """The number of runs (points) a sweep trains."""
    if sweep.kind == "points":
        return len(sweep.runs)
    return len(sweep.d_models) * len(sweep.budgets_flops if sweep.kind == "isoflop" else sweep.tokens)


def validate_sweep_numbers(sweep: SweepConfig) -> None:
    """The ranges of the sweep's numbers, whether or not a sweep is chosen (validate runs this for every stage)."""
    for key in ("budgets_flops", "tokens", "d_models", "predict_flops"):
        for value in getattr(sweep, key):
            positive(f"sweep.{key}", value)
    for key in ("aspect_ratio", "head_dim"):
        positive(f"sweep.{key}", getattr(sweep, key))
    non_negative("sweep.n_bootstrap", sweep.n_bootstrap, "0: no bootstrap intervals")
    for key in ("lr_base_width", "bootstrap_starts"):
        if getattr(sweep, key) is not None:
            positive(f"sweep.{key}", getattr(sweep, key))
    if sweep.point is not None:
        non_negative("sweep.point", sweep.point, "an index into the sweep's grid")
    for i, run in enumerate(sweep.runs):
        positive(f"sweep.runs.{i}.d_model", run.d_model)
        positive(f"sweep.runs.{i}.tokens", run.tokens)
        if run.budget_flops is not None:
            positive(f"sweep.runs.{i}.budget_flops", run.budget_flops)
        if run.lr is not None and not 0.0 < run.lr < 1.0:
            raise ConfigError(f"sweep.runs.{i}.lr={run.lr!r} must be in (0, 1), or null for train.lr.")


def validate_sweep(sweep: SweepConfig, train: TrainConfig | None = None) -> None:
    choice("sweep.kind", sweep.kind, SweepKind)
    validate_sweep_numbers(sweep)
    if sweep.name == "none":
        raise ConfigError("no sweep chosen: pass sweep=<name> (e.g. sweep=isoflop_tiny; see conf/sweep/).")
    widths = [r.d_model for r in sweep.runs] if sweep.kind == "points" else sweep.d_models
    if not widths:
        raise ConfigError("sweep.runs is empty: run `pipeline scaling plan` to write them." if sweep.kind == "points"
                          else "sweep.d_models is empty: list the model widths to train.")
    for d in widths:
        if d % sweep.head_dim:
            raise ConfigError(f"sweep holds the width {d}, not a multiple of sweep.head_dim={sweep.head_dim}.")
    if sweep.kind == "isoflop" and not sweep.budgets_flops:
        raise ConfigError("sweep.kind=isoflop needs sweep.budgets_flops (compute budgets in FLOPs).")
    if sweep.kind == "grid" and not sweep.tokens:
        raise ConfigError("sweep.kind=grid needs sweep.tokens (training tokens per run).")
    if sweep.branches and train is not None and train.schedule != "wsd":
        raise ConfigError(
            f"sweep.branches=true with train.schedule={train.schedule}: decay branches fork from the stable phase "
            f"of a WSD schedule; pass train.schedule=wsd (or sweep.branches=false for one run per point)."
        )
    if sweep.branches and sweep.point is not None:
        raise ConfigError(
            f"sweep.point={sweep.point} with sweep.branches=true: a decay branch needs its model size's longest run "
            f"trained first, so one process trains a branched sweep; drop sweep.point (or set sweep.branches=false "
            f"to run every point as its own job)."
        )
    n_points = sweep_size(sweep)
    if sweep.point is not None and not 0 <= sweep.point < n_points:
        raise ConfigError(f"sweep.point={sweep.point} is outside the grid of sweep {sweep.name}, which has {n_points} "
                          f"points: use 0 .. {n_points - 1} (e.g. 'sweep.point=range({n_points})' with -m).")
