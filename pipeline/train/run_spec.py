"""What the driver hands every training worker (RunSpec, and the MLflow run to report to: RunLink), and what
rank 0 hands back (TrainOutcome): plain data, resolved once on the driver, that travels to the workers.

The layout (precision, gradient accumulation, the DeepSpeed config) is decided by `resolve_layout` alone: the
train stage calls it before preparing data (with the tokenizer's vocabulary), the driver's `resolve_run` again
with the data set's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster.storage import Mirror
from pipeline.config import ModelConfig, ParallelConfig, PipelineConfig, TrainConfig, grad_accumulation_steps
from pipeline.train.ds_config import check_with_deepspeed, make_ds_config, resolve_precision
from pipeline.train.memory_plan import check_layout_fits


@dataclass(frozen=True)
class Layout:
    """How a model is computed and laid out over the ranks."""

    model: ModelConfig
    precision: str
    grad_accum_steps: int
    ds_config: dict


def resolve_layout(cfg: PipelineConfig, model: ModelConfig) -> Layout:
    """The precision, gradient accumulation and DeepSpeed config for `model` (the config's model with its
    vocabulary resolved). Refused before any work: a precision the device cannot do, a layout that does not fit
    the device (on CPU: the host's RAM per rank), expert DeepSpeed settings DeepSpeed refuses."""
    precision = resolve_precision(cfg.parallel)
    check_layout_fits(model, cfg.parallel, cfg.train, precision, cfg.cluster.workers_per_node)
    accum = grad_accumulation_steps(cfg.train, cfg.parallel, model.context_length)
    ds_config = make_ds_config(cfg.train, cfg.parallel, precision, accum, d_model=model.d_model)
    if cfg.parallel.deepspeed or cfg.parallel.offload_optimizer:
        check_with_deepspeed(ds_config)
    return Layout(model, precision, accum, ds_config)


@dataclass(frozen=True)
class RunLink:
    """The MLflow run a run's workers report to (opened by the driver once the spec is resolved)."""

    # May carry credentials (http://user:secret@host): out of the repr, so that no message or log shows them.
    tracking_uri: str | None = field(default=None, repr=False)
    run_id: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs, resolved once on the driver (pipeline.train.driver.resolve_run; plain data: it
    travels to Ray workers)."""

    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    data_dir: str
    run_dir: str
    precision: str
    grad_accum_steps: int
    ds_config: dict
    flops_per_token: float
    config_fingerprint: str
    # The config keys that change the numbers (model, optimisation, data): compared on resume.
    math_config: dict
    tokenizer_sha256: str
    # The checkpoint tag to load (train.resume resolved on the driver; a universal one when ds_config says so).
    resume_from: str | None = None
    # Unique id of this launch of the run (set on the driver), kept in its checkpoints: a worker group that Ray
    # restarts after a failure continues from the launch's own newest checkpoint, not from resume_from again.
    launch_id: str = ""
    # Per-step losses and gradient norms (rank 0) are returned to the driver when true; used by equivalence
    # tests.
    record_losses: bool = False
    # cluster.storage_uri: the object store that holds the data set and the checkpoints (pipeline.cluster.storage).
    storage_uri: str | None = field(default=None, repr=False)
    # cluster.background_uploads: checkpoints go to the store while training goes on (false: the save waits).
    background_uploads: bool = True
    # cluster.local_checkpoints: the complete checkpoints a node keeps on its disk with a store (0: as the store).
    local_checkpoints: int = 0
    # tracking.system_metrics_interval_s (0: no system metrics).
    system_metrics_interval_s: float = 0.0
    # eval.max_tokens: the validation budget scored on the workers every train.eval_interval_steps (null: all).
    eval_max_tokens: int | None = None
    # eval.tasks and eval.tasks_limit, scored on the workers every train.downstream_interval_steps (empty: none).
    downstream_tasks: list[str] = field(default_factory=list)
    downstream_limit: int | None = None

    def mirror(self) -> Mirror:
        """The run's data set and directory, mirrored to its object store (every call a no-op without one)."""
        return Mirror(self.storage_uri, data_root=Path(self.data_dir).parent, runs_root=Path(self.run_dir).parent)


@dataclass
class TrainOutcome:
    final_step: int
    losses: dict[int, float]
    preempted: bool
    checkpoint: str
    tokens_per_s: float
    resumed_from: str | None
    # Ray node id of every rank (filled in under Ray Train).
    worker_nodes: list[str] | None = None
    # Gradient norm (before clipping) of every step, when spec.record_losses.
    grad_norms: dict[int, float] = field(default_factory=dict)
    # Elements of the parameters this rank holds: fewer than the model's under tensor parallelism (AutoTP shards
    # the projections), its partitions of them under ZeRO-3.
    local_parameters: int = 0
    # Tokens/s from the end of the run's second step to its end: the steady rate, without start-up.
    steady_tokens_per_s: float = 0.0
    # Why the run stopped when it failed (e.g. it diverged: non-finite gradients too many times in a row).
    failure: str | None = None
    # Wall-clock times (time.time()) of rank 0's start-up phases and steps (pipeline.train.startup).
    timeline: dict[str, float] = field(default_factory=dict)
    # Validation loss by step, scored on the workers (train.eval_interval_steps and the last step).
    val_losses: dict[int, float] = field(default_factory=dict)
    # Validation tokens scored per second on the workers (all ranks together), over the run's evaluations.
    val_tokens_per_s: float = 0.0
    # Downstream scores by step (lm_eval.<task>.<metric>), scored on the workers (train.downstream_interval_steps).
    downstream: dict[int, dict[str, float]] = field(default_factory=dict)
