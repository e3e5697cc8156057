"""parallel.*: how the training job is spread over workers (data, tensor and sequence parallelism, ZeRO, precision)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.base import Choice, ConfigError, choice, divisors, positive, validate_finite
from pipeline.config.model import ModelConfig, kv_heads, mlp_width


class Precision(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@dataclass
class ParallelConfig:
    """How the training job is spread over workers."""

    # Ray Train workers (processes); world size = tensor_parallel x sequence_parallel x data parallel size.
    num_workers: int = 2
    # DeepSpeed AutoTP degree; must divide n_head, d_ff and num_workers.
    tensor_parallel: int = 1
    # DeepSpeed Ulysses sequence-parallel degree: the ranks of a group (consecutive ranks) train the same windows,
    # each the activations of context_length / N positions, exchanging heads for positions around attention
    # (all-to-all). Must divide n_head, n_kv_head, context_length and num_workers; not with tensor_parallel > 1.
    sequence_parallel: int = 1
    # DeepSpeed ZeRO stage 0, 1, 2 or 3.
    zero_stage: int = 1
    # auto | bf16 | fp16 | fp32 (auto: bf16 where the device supports it, else fp32)
    precision: Precision = Precision.auto
    # Recompute each block's activations in the backward pass.
    activation_checkpointing: bool = False
    # Train on GPUs (NCCL); false trains on CPU with gloo.
    use_gpu: bool = False
    # GPUs reserved for each worker when use_gpu (a worker drives one device; more reserves whole GPUs for it).
    gpus_per_worker: float = 1.0
    # CPU cores reserved for each worker.
    cpus_per_worker: int = 1
    # glibc's mmap threshold in each training worker, in bytes (mallopt M_MMAP_THRESHOLD, set as the worker
    # starts): host blocks this large and larger come from mmap and go back to the system when freed. ZeRO-3's
    # gathers and releases otherwise leave about 1.4 GiB of freed memory resident per rank at dp 2 on CPU
    # (pipeline.train.distributed.limit_freed_memory). 0 keeps glibc's dynamic threshold.
    malloc_mmap_threshold: int = 131072
    # Memory of one device in GiB that the planner (`pipeline plan`) checks the layout against before training;
    # null: the driver's GPU when it sees one (parallel.use_gpu; no check when it sees none), and on CPU the host's
    # RAM divided between the ranks of one machine (num_workers, or cluster.workers_per_node when set).
    device_memory_gb: float | None = None
    # Refuse a layout the planner says does not fit the device; false trains anyway.
    check_memory: bool = True
    # Keep the optimizer states (and fp32 master weights) in CPU memory (DeepSpeed's ZeRO-Offload; ZeRO 1-3).
    offload_optimizer: bool = False
    # Expert DeepSpeed settings merged into the generated config (nested dicts merge, a key given here wins),
    # checked by DeepSpeed's own config model before workers start: buckets, overlap, offload parameters, ...
    # e.g. +parallel.deepspeed.zero_optimization.reduce_bucket_size=50000000. What the pipeline sets itself
    # (DEEPSPEED_OWNED) and keys that make DeepSpeed write files are refused (validate_deepspeed).
    deepspeed: dict[str, Any] = field(default_factory=dict)


PRECISIONS = Precision.values()


def validate_parallel(parallel: ParallelConfig, model: ModelConfig) -> None:
    validate_finite(parallel, "parallel.")  # `pipeline plan` validates this section alone
    positive("parallel.num_workers", parallel.num_workers)
    positive("parallel.tensor_parallel", parallel.tensor_parallel)
    positive("parallel.sequence_parallel", parallel.sequence_parallel)
    positive("parallel.cpus_per_worker", parallel.cpus_per_worker)
    if not 0 <= parallel.malloc_mmap_threshold <= 1 << 30:
        raise ConfigError(f"parallel.malloc_mmap_threshold={parallel.malloc_mmap_threshold} must be in [0, 1 GiB] "
                          f"(bytes; 0 keeps glibc's dynamic threshold)")
    if parallel.device_memory_gb is not None:
        positive("parallel.device_memory_gb", parallel.device_memory_gb)
    if parallel.gpus_per_worker <= 0:
        raise ConfigError(f"parallel.gpus_per_worker={parallel.gpus_per_worker} must be > 0.")
    choice("parallel.precision", parallel.precision, Precision)
    if parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={parallel.zero_stage} must be 0, 1, 2 or 3.")
    tp = parallel.tensor_parallel
    if parallel.num_workers % tp:
        raise ConfigError(
            f"parallel.num_workers={parallel.num_workers} is not divisible by parallel.tensor_parallel={tp}: "
            f"the world size must be tensor_parallel x data-parallel size."
        )
    if model.n_head % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.n_head={model.n_head}: "
            f"choose a tensor-parallel degree among {', '.join(map(str, divisors(model.n_head)))}."
        )
    if kv_heads(model) % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.n_kv_head={kv_heads(model)}: AutoTP splits the "
            f"key/value heads across ranks; choose a degree among {', '.join(map(str, divisors(kv_heads(model))))} "
            f"or more key/value heads."
        )
    if model.attention_kernel == "flex" and not parallel.use_gpu:
        raise ConfigError(
            "model.attention_kernel=flex trains only on GPUs: FlexAttention has no backward pass on CPU in this "
            "torch. Use model.attention_kernel=auto (sdpa on CPU) or parallel.use_gpu=true."
        )
    if model.pos_encoding == "alibi" and tp > 1:
        raise ConfigError(
            "model.pos_encoding=alibi with parallel.tensor_parallel > 1: each rank would need the slopes of the "
            "heads AutoTP gives it, which it cannot know; train ALiBi models with tensor_parallel=1 (ZeRO shards "
            "them) or choose rotary positions."
        )
    validate_sequence_parallel(parallel, model)
    d_ff = mlp_width(model)  # 8/3 d_model rounded for SwiGLU when d_ff is null
    if d_ff % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.d_ff={d_ff}.")
    if parallel.offload_optimizer and parallel.zero_stage == 0:
        raise ConfigError(
            "parallel.offload_optimizer=true needs ZeRO (DeepSpeed offloads the optimizer states it partitions): "
            "set parallel.zero_stage to 1, 2 or 3."
        )


def validate_sequence_parallel(parallel: ParallelConfig, model: ModelConfig) -> None:
    sp = parallel.sequence_parallel
    if sp == 1:
        return
    if parallel.tensor_parallel > 1:
        raise ConfigError(
            f"parallel.sequence_parallel={sp} with parallel.tensor_parallel={parallel.tensor_parallel}: DeepSpeed's "
            f"Ulysses groups (deepspeed.runtime.sequence_parallel.parallel_state_sp) have no tensor-parallel "
            f"dimension, and AutoTP installs its own; use one of the two (sequence parallelism splits the "
            f"activations of long windows, tensor parallelism the weights), with ZeRO-3 to shard the rest."
        )
    if parallel.num_workers % sp:
        raise ConfigError(
            f"parallel.num_workers={parallel.num_workers} is not divisible by parallel.sequence_parallel={sp}: the "
            f"world size must be sequence_parallel x data-parallel size."
        )
    for name, count in (("model.n_head", model.n_head), ("model.n_kv_head", kv_heads(model))):
        if count % sp:
            raise ConfigError(
                f"parallel.sequence_parallel={sp} does not divide {name}={count}: Ulysses gives each rank of the "
                f"group {name.split('.')[1]} / {sp} whole heads; choose a degree among "
                f"{', '.join(map(str, divisors(count)))}."
            )
    if model.context_length % sp:
        raise ConfigError(
            f"parallel.sequence_parallel={sp} does not divide model.context_length={model.context_length}: each "
            f"rank of the group takes an equal slice of every window; choose a degree that divides it."
        )


def replica_size(parallel: ParallelConfig) -> int:
    """The ranks that train the same windows (one data-parallel replica): the tensor- or sequence-parallel group."""
    return parallel.tensor_parallel * parallel.sequence_parallel


def data_parallel_size(parallel: ParallelConfig) -> int:
    return parallel.num_workers // replica_size(parallel)
