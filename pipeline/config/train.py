"""train.*: optimisation, schedule, logging and checkpointing of a training run, and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.base import (
    FREE,
    LENGTH,
    MATH,
    Choice,
    ConfigError,
    choice,
    fraction,
    later,
    non_negative,
    positive,
)
from pipeline.config.model import ModelConfig
from pipeline.config.parallel import ParallelConfig, data_parallel_size


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"
    constant = "constant"


class Optimizer(Choice):
    adamw = "adamw"
    muon = "muon"


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing of a training run."""

    max_steps: int = field(default=300, metadata=LENGTH)
    # Sequences per worker per micro-step.
    micro_batch_size: int = field(default=8, metadata=MATH)
    # Tokens per optimizer step over all workers; gradient accumulation fills the gap.
    global_batch_tokens: int = field(default=4096, metadata=MATH)
    lr: float = field(default=3e-3, metadata=MATH)
    # The schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = field(default=0.1, metadata=MATH)
    warmup_steps: int = field(default=30, metadata=MATH)
    # cosine | wsd (warmup-stable-decay) | constant
    schedule: Schedule = field(default=Schedule.cosine, metadata=MATH)
    # For wsd: fraction of steps spent in the final decay (it starts at wsd_decay_start(max_steps, decay_fraction)).
    decay_fraction: float = field(default=0.2, metadata=MATH)
    weight_decay: float = field(default=0.1, metadata=MATH)
    beta1: float = field(default=0.9, metadata=MATH)
    beta2: float = field(default=0.95, metadata=MATH)
    # adamw | muon: Muon (Jordan et al. 2024; DeepSpeed's MuonWithAuxAdam, which ZeRO 1-3 partition) for the 2-D
    # hidden matrices of the blocks, AdamW (lr, betas, no decay) for embeddings, unembedding, norms and biases.
    optimizer: Optimizer = field(default=Optimizer.adamw, metadata=later("adamw"))
    # Muon's learning rate (in units of spectral norm per update; Keller Jordan's 0.02) and momentum. The
    # schedule scales it like train.lr; Muon's matrices decay by train.weight_decay. train.grad_clip does not
    # apply with Muon (DeepSpeed would clip the gradients at ZeRO-0 but the orthogonalised updates at ZeRO 1-2).
    muon_lr: float = field(default=0.02, metadata=later(0.02))
    muon_momentum: float = field(default=0.95, metadata=later(0.95))
    grad_clip: float = field(default=1.0, metadata=MATH)
    seed: int = field(default=1337, metadata=MATH)
    log_interval_steps: int = field(default=10, metadata=FREE)
    # Validation on the training workers (the training layout, each rank a slice) every N steps and at the
    # last step, over the eval.max_tokens budget; logged as val_loss, val_perplexity, val_bits_per_byte at the
    # step (0: none during training; pipeline evaluate scores checkpoints). The shipped conf/train/default.yaml
    # sets 100; a TrainConfig built in code validates only when asked (validation reads the data set's tokenizer).
    eval_interval_steps: int = field(default=0, metadata=FREE)
    # Downstream scores during training: the log-likelihood tasks of eval.tasks (lm-eval-harness, offline; at most
    # eval.tasks_limit examples each) scored on the training workers with the training layout, each data-parallel
    # replica a share of the examples, every N steps and at the last step; logged as lm_eval.<task>.<metric> at
    # the step, beside the validation loss (0: only at `pipeline evaluate`). pipeline.data.downstream.
    downstream_interval_steps: int = field(default=0, metadata=FREE)
    # Checkpoint every N steps (0: only at the end).
    save_interval_steps: int = field(default=0, metadata=FREE)
    # Checkpoints at these steps as well (a WSD sweep forks its decay branches from them); with
    # keep_last_checkpoints > 0 they rotate out like the others.
    save_at_steps: list[int] = field(default_factory=list, metadata=FREE)
    keep_last_checkpoints: int = field(default=2, metadata=FREE)
    # Write checkpoints while training goes on: each rank copies its state in memory (the stall) and a thread of
    # its own writes and hashes the files; the checkpoint is committed (COMPLETE, `latest`) at the first step
    # boundary after every rank's files are written, so until then the previous one is the one to resume from.
    # Costs one more copy of the rank's model and optimizer states in host memory while a write is in flight.
    async_checkpoint: bool = field(default=False, metadata=FREE)
    # auto (latest complete checkpoint of this run, if any) | none | <path of a checkpoint tag>
    resume: str = field(default="auto", metadata=FREE)
    # Resume even when the checkpoint was trained with a different config (keys that change the math).
    allow_config_change: bool = field(default=False, metadata=FREE)
    # Optimizer steps skipped in a row for non-finite gradients (each retried on the same batch) before the run
    # stops with an error naming the step; earlier checkpoints are kept.
    max_skipped_steps: int = field(default=5, metadata=FREE)
    # Worker-group failures recovered from (pipeline.train.ray_launch: the group launched again, placed on the
    # nodes alive then, from the latest complete checkpoint); -1: no limit.
    max_failures: int = field(default=0, metadata=FREE)
    # Peak device throughput in TFLOP/s for MFU; null measures a matmul at start-up.
    peak_tflops: float | None = field(default=None, metadata=FREE)
    compile: bool = field(default=False, metadata=FREE)


SCHEDULES = Schedule.values()
OPTIMIZERS = Optimizer.values()


def wsd_decay_start(max_steps: int, decay_fraction: float) -> int:
    """The first step of a WSD schedule's decay: the last round(max_steps * decay_fraction) steps (at least one)
    decay. Before it the learning rate does not depend on max_steps, which is what lets a longer run's
    checkpoint there start a shorter run's decay (a WSD branch)."""
    return max_steps - max(1, round(max_steps * decay_fraction))


def grad_accumulation_steps(train: TrainConfig, parallel: ParallelConfig, context_length: int) -> int:
    per_step = train.micro_batch_size * data_parallel_size(parallel) * context_length
    return train.global_batch_tokens // per_step


def _validate_train_numbers(train: TrainConfig) -> None:
    """The ranges of train's numbers (each field's comment says what 0 means where 0 is allowed)."""
    for key in ("max_steps", "micro_batch_size", "global_batch_tokens", "log_interval_steps"):
        positive(f"train.{key}", getattr(train, key))
    for key in ("lr", "muon_lr"):  # AdamW's rates are ~1e-4 to 1e-2 and Muon's ~0.02: 1 or more is a typo
        value = getattr(train, key)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"train.{key}={value!r} must be in (0, 1): set a learning rate such as 3e-4.")
    for key in ("beta1", "beta2", "muon_momentum"):
        fraction(f"train.{key}", getattr(train, key))
    non_negative("train.weight_decay", train.weight_decay, "0 turns decay off")
    non_negative("train.grad_clip", train.grad_clip, "0 turns clipping off")
    non_negative("train.seed", train.seed, "numpy's generators take no negative seed")
    non_negative("train.eval_interval_steps", train.eval_interval_steps, "0: no validation during training")
    non_negative("train.downstream_interval_steps", train.downstream_interval_steps, "0: no downstream scores "
                 "during training")
    non_negative("train.save_interval_steps", train.save_interval_steps, "0: a checkpoint only at the end")
    non_negative("train.keep_last_checkpoints", train.keep_last_checkpoints, "0 keeps every checkpoint")
    non_negative("train.max_skipped_steps", train.max_skipped_steps, "0 stops at the first non-finite step")
    if train.max_failures < -1:  # Ray Train's FailureConfig: -1 retries without limit
        raise ConfigError(f"train.max_failures={train.max_failures} must be >= 0, or -1 for no limit: set "
                          f"train.max_failures to the worker-group failures to recover from.")
    if train.peak_tflops is not None:
        positive("train.peak_tflops", train.peak_tflops)
    if train.warmup_steps < 0 or train.warmup_steps >= train.max_steps:
        raise ConfigError(
            f"train.warmup_steps={train.warmup_steps} must be in [0, train.max_steps={train.max_steps})."
        )
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={train.min_lr_ratio} must be in [0, 1].")
    if not 0.0 < train.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={train.decay_fraction} must be in (0, 1].")
    for step in train.save_at_steps:
        if not 0 < step <= train.max_steps:
            raise ConfigError(f"train.save_at_steps holds {step}: each must be in [1, train.max_steps="
                              f"{train.max_steps}].")


def validate_train(train: TrainConfig, parallel: ParallelConfig, model: ModelConfig) -> None:
    _validate_train_numbers(train)
    choice("train.schedule", train.schedule, Schedule)
    choice("train.optimizer", train.optimizer, Optimizer)
    if train.compile and parallel.sequence_parallel > 1:
        raise ConfigError(
            "train.compile=true with parallel.sequence_parallel > 1: DeepSpeed's Ulysses all-to-all fills its output "
            "through a collective inside an autograd function, which torch.compile may inline without its backward "
            "(DeepSpeed's own warning: the layers before it would then get no gradient); train sequence-parallel "
            "runs eagerly (train.compile=false)."
        )
    if train.optimizer == "muon":
        if parallel.tensor_parallel > 1:
            raise ConfigError(
                "train.optimizer=muon with parallel.tensor_parallel > 1: Muon orthogonalises each whole matrix, "
                "AutoTP leaves each rank a slice of it, and DeepSpeed does not gather the slices for Muon; train "
                "Muon with tensor_parallel=1 (ZeRO 1-3 partition its state) or use train.optimizer=adamw."
            )
        if parallel.sequence_parallel > 1:
            raise ConfigError(
                "train.optimizer=muon with parallel.sequence_parallel > 1: DeepSpeed's Muon under ZeRO gathers and "
                "orthogonalises each matrix over the data-parallel group, and with Ulysses' groups its gradient "
                "averaging is untested (the pipeline's equivalence tests cover AdamW); use train.optimizer=adamw "
                "for sequence-parallel runs."
            )
        if model.mup_base_width is not None:
            raise ConfigError(
                "train.optimizer=muon with model.mup_base_width: µP's rules here are AdamW's (lr / m on hidden "
                "matrices); Muon's per-matrix scale sets its own width dependence. Use one or the other."
            )
        if parallel.offload_optimizer:
            raise ConfigError(
                "train.optimizer=muon with parallel.offload_optimizer=true: DeepSpeed's offloaded optimizer step "
                "runs on CPU partitions of each matrix, and Muon orthogonalises whole matrices (its offload path is "
                "untested here); keep the optimizer on the device (offload_optimizer=false) and shard Muon's state "
                "with ZeRO 1-3 instead."
            )
    dp = data_parallel_size(parallel)
    per_step = train.micro_batch_size * dp * model.context_length
    if train.global_batch_tokens % per_step:
        raise ConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} is not divisible by micro_batch_size "
            f"x data-parallel size x context_length = {train.micro_batch_size} x {dp} x "
            f"{model.context_length} = {per_step}: set train.global_batch_tokens to a multiple of {per_step}."
        )
    if train.resume not in ("auto", "none") and not Path(train.resume).exists():
        raise ConfigError(
            f"train.resume={train.resume} is neither auto, none nor an existing checkpoint directory."
        )
