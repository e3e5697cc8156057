"""The DeepSpeed config, generated from the typed Hydra config (never written by hand)."""

from __future__ import annotations

from typing import Any

from pipeline.config import ConfigError, ParallelConfig, TrainConfig
from pipeline.model.tensor_parallel import AUTOTP_LAYER_SPECS


def cpu_supports_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(parallel: ParallelConfig) -> str:
    """auto -> bf16 where the device supports it, else fp32. fp16 needs a GPU. A plain str (not the Precision
    member): it goes into the run's math config, MLflow and the workers' run spec."""
    import torch

    if parallel.use_gpu:
        if parallel.precision == "auto":
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
        return str(parallel.precision)
    if parallel.precision == "fp16":
        raise ConfigError(
            "parallel.precision=fp16 needs a GPU (fp16 with loss scaling is not supported by DeepSpeed's CPU "
            "accelerator): use parallel.precision=bf16 or fp32 on CPU, or parallel.use_gpu=true."
        )
    if parallel.precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return str(parallel.precision)


MIN_BUCKET_ELEMENTS = 2**24


def bucket_sizes(d_model: int, zero_stage: int) -> dict[str, int]:
    """Communication buckets that follow the model's width (as Hugging Face's DeepSpeed integration sets them
    for "auto"): DeepSpeed's defaults (5e8 elements per reduce bucket, and ZeRO-3 keeping up to 1e9 gathered
    elements alive) hold gigabytes per rank whatever the model, more than a 300 M-parameter model's own
    states at dp=2 (measured: benchmarks/zero_memory.py)."""
    # Not below 2^24 elements: smaller buckets made the tiny default model's ZeRO-1 step latency-bound (82 gloo
    # all-reduces a step instead of 1: 9.8k against 11k tokens/s).
    bucket = max(d_model * d_model, MIN_BUCKET_ELEMENTS)
    sizes = {"reduce_bucket_size": bucket}
    if zero_stage == 3:
        sizes |= {"stage3_prefetch_bucket_size": int(0.9 * bucket),
                  "stage3_param_persistence_threshold": 10 * d_model,
                  "stage3_max_live_parameters": 10 * d_model * d_model,
                  # Gathered weights are released after use, not kept until the backward pass reuses them.
                  "stage3_max_reuse_distance": 10 * d_model * d_model,
                  # The optimizer steps one sub-group at a time; its fp32 gradient copies are that large at most.
                  "sub_group_size": 10 * d_model * d_model}
    return sizes


def make_ds_config(
    train: TrainConfig, parallel: ParallelConfig, precision: str, grad_accum_steps: int, d_model: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of a training run; with d_model, communication buckets sized by the model
    (bucket_sizes) instead of DeepSpeed's fixed defaults."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        # DeepSpeed checks this against the whole world size, tensor-parallel ranks included, when the TP
        # groups come from the config (no mpu), and against world / sequence_parallel with Ulysses' groups (its
        # mpu); the samples per step are micro x accum x dp all the same.
        "train_batch_size": train.micro_batch_size * grad_accum_steps * parallel.num_workers
        // parallel.sequence_parallel,
        # Not with Muon: DeepSpeed clips the raw gradients at ZeRO-0 but Muon's orthogonalised updates at ZeRO
        # 1-2 (measured: the layouts then disagree from step 2), and Muon's updates have spectral norm ~1 anyway.
        "gradient_clipping": 0.0 if train.optimizer == "muon" else train.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage,
                              **(bucket_sizes(d_model, parallel.zero_stage) if d_model and parallel.zero_stage else {})},
        # The optimizer is torch AdamW built by pipeline.train.optimizer (param groups, decoupled decay);
        # ZeRO partitions it like any other.
        "zero_allow_untested_optimizer": True,
        **bf16_settings(precision, parallel.zero_stage),
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.optimizer == "muon" and parallel.zero_stage == 3:
        # DeepSpeed's ZeRO-3 runs Muon on whole gradients, all-gathered per sub-group: it refuses reduce-scatter
        # ("Muon and reduce scatter cannot be used together").
        config["zero_optimization"]["reduce_scatter"] = False
    if parallel.tensor_parallel > 1:
        config["tensor_parallel"] = {
            "autotp_size": parallel.tensor_parallel,
            "partition_config": {"use_default_specs": False, "layer_specs": AUTOTP_LAYER_SPECS},
        }
    if parallel.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": parallel.use_gpu}
        config["zero_force_ds_cpu_optimizer"] = False  # our optimizer is torch's AdamW, not DeepSpeedCPUAdam
    return merge(config, parallel.deepspeed)


def bf16_settings(precision: str, zero_stage: int) -> dict[str, Any]:
    """bf16 with fp32 master weights, and gradients accumulated over micro-batches and reduced over ranks in
    fp32 (bf16's 8-bit mantissa loses small gradients in a running sum; summing dp copies rounds again).

    ZeRO 0 and 1: the weights stay fp32 (they are the master weights) and the matrix products run under
    torch.autocast in bf16 (DeepSpeed's torch_autocast); gradients, their reduction and the optimizer are fp32,
    and checkpoints are ordinary ZeRO checkpoints. DeepSpeed's own bf16 mode cannot do this there: without ZeRO
    its engine raises NotImplementedError for fp32 accumulation, and at ZeRO-1 it switches to BF16_Optimizer,
    whose checkpoints zero_to_fp32 cannot consolidate and whose unpartitioned fp32 gradients cost as much
    memory as fp32 weights. No module is marked for 16-bit gradient communication.
    ZeRO 2 and 3: DeepSpeed's bf16 mode (16-bit weights, fp32 master partition) with grad_accum_dtype and
    communication_data_type fp32, i.e. the ZeRO optimizers' fp32 gradient partitions."""
    if precision != "bf16":
        return {"bf16": {"enabled": False}}
    if zero_stage <= 1:
        return {"bf16": {"enabled": False},
                "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    return {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """base with extra's keys set (nested dicts merged key by key; a value of extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def check_with_deepspeed(config: dict[str, Any]) -> None:
    """Read the config through DeepSpeed's own config model (its sub-configs refuse unknown keys and wrong
    types) before any worker starts. The world size is not known here: the batch-size check is left to the
    workers, which recompute it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    single = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(single)
    except Exception as err:  # DeepSpeed raises pydantic's ValidationError, AssertionError, ValueError, ...
        raise ConfigError(f"DeepSpeed refuses the generated config (parallel.deepspeed and the settings it "
                          f"merges into): {err}") from err
