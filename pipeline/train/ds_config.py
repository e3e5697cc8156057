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
    """auto -> bf16 where the device supports it, else fp32. fp16 needs a GPU."""
    import torch

    if parallel.use_gpu:
        if parallel.precision == "auto":
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
        return parallel.precision
    if parallel.precision == "fp16":
        raise ConfigError(
            "parallel.precision=fp16 needs a GPU (fp16 with loss scaling is not supported by DeepSpeed's CPU "
            "accelerator): use parallel.precision=bf16 or fp32 on CPU, or parallel.use_gpu=true."
        )
    if parallel.precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return parallel.precision


def make_ds_config(
    train: TrainConfig, parallel: ParallelConfig, precision: str, grad_accum_steps: int
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        # DeepSpeed checks this against the whole world size, tensor-parallel ranks included, when the TP
        # groups come from the config (no mpu); the samples per step are micro x accum x dp all the same.
        "train_batch_size": train.micro_batch_size * grad_accum_steps * parallel.num_workers,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        # The optimizer is torch AdamW built by pipeline.train.optimizer (param groups, decoupled decay);
        # ZeRO partitions it like any other.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
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
    if parallel.tensor_parallel > 1:
        config["tensor_parallel"] = {
            "autotp_size": parallel.tensor_parallel,
            "partition_config": {"use_default_specs": False, "layer_specs": AUTOTP_LAYER_SPECS},
        }
    return config
