"""What the driver hands every training worker (TrainJob), and what rank 0 hands back (TrainOutcome): plain data,
resolved on the driver, that travels to Ray workers."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ModelConfig, ParallelConfig, TrainConfig


@dataclass
class TrainJob:
    """Everything a worker needs, resolved on the driver (plain data: it travels to Ray workers)."""

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
    # A checkpoint tag to load (resolved on the driver from train.resume), and whether it is universal.
    resume_from: str | None = None
    # Unique id of this training job (set on the driver), kept in its checkpoints: a worker group that Ray
    # restarts after a failure continues from the job's own newest checkpoint, not from resume_from again.
    job_id: str = ""
    # May carry credentials (http://user:secret@host): out of the job's repr, so that no message or log shows them.
    tracking_uri: str | None = field(default=None, repr=False)
    mlflow_run_id: str | None = None
    # Per-step losses and gradient norms (rank 0) are returned to the driver when true; used by equivalence
    # tests.
    record_losses: bool = False
    extra: dict = field(default_factory=dict)
    # cluster.storage_uri: the object store that holds the data set and the checkpoints (pipeline.cluster.storage).
    storage_uri: str | None = field(default=None, repr=False)
    # tracking.system_metrics_interval_s (0: no system metrics).
    system_metrics_interval_s: float = 0.0
    # eval.max_tokens: the validation budget scored on the workers every train.eval_interval_steps (null: all).
    eval_max_tokens: int | None = None


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
    # Gradient norm (before clipping) of every step, when job.record_losses.
    grad_norms: dict[int, float] = field(default_factory=dict)
    # Elements of the parameters this rank's module holds: fewer than the model's under tensor parallelism
    # (AutoTP shards the projections), 0 under ZeRO-3 (DeepSpeed keeps only flat partitions).
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
