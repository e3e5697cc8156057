"""parallel.deepspeed: the expert DeepSpeed settings passed through to the generated config, and what they may
not hold (what the pipeline sets itself, what it would not record, what writes files).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.config.base import ConfigError
from pipeline.config.parallel import ParallelConfig
from pipeline.config.train import TrainConfig

# DeepSpeed settings the pipeline derives itself (pipeline.train.ds_config.make_ds_config, and the driver's universal
# loading), each with the field that owns it: through parallel.deepspeed they would train another layout than the one
# the pipeline records, plans and checkpoints. A dotted key covers everything below it.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_tokens",
    "gradient_accumulation_steps": "train.global_batch_tokens",
    "elasticity": "train.global_batch_tokens",  # elastic training chooses its own batch sizes
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer.device": "parallel.offload_optimizer",
    "zero_force_ds_cpu_optimizer": "parallel.offload_optimizer",
    "tensor_parallel": "parallel.tensor_parallel",
    "sequence_parallel_size": "parallel.sequence_parallel",
    "data_parallel_size": "parallel.sequence_parallel",  # with sequence_parallel_size, DeepSpeed's own SP mesh
    "bf16": "parallel.precision",
    "bfloat16": "parallel.precision",  # DeepSpeed's older name of bf16
    "fp16": "parallel.precision",
    "amp": "parallel.precision",
    "torch_autocast": "parallel.precision",
    "data_types": "parallel.precision",
    "communication_data_type": "parallel.precision",
    "seq_parallel_communication_data_type": "parallel.precision",
    "optimizer": "train.optimizer",
    "zero_allow_untested_optimizer": "train.optimizer",
    "scheduler": "train.schedule",
    # How checkpoints are written and loaded is pipeline.checkpoint's; universal loading follows train.resume.
    "checkpoint": "train.resume",
    "datastates_ckpt": "train.resume",
    "zero_optimization.elastic_checkpoint": "train.resume",
    "zero_optimization.load_from_fp32_weights": "train.resume",
}


# DeepSpeed features that change what a step computes, or how ZeRO partitions the states (and so a checkpoint's
# layout), without the run recording it: its config, math fingerprint, plan and checkpoints would not describe
# what trained.
DEEPSPEED_UNRECORDED = {
    "curriculum_learning": "the order and length of the training samples",
    "data_efficiency": "the order and length of the training samples",
    "progressive_layer_drop": "which layers train at each step",
    "compression_training": "the model's weights and activations",
    "quantize_training": "the precision of the weights",
    "eigenvalue": "the optimizer's step",
    "prescale_gradients": "how gradients are averaged",
    "gradient_predivide_factor": "how gradients are averaged",
    "zero_optimization.mics_shard_size": "how ZeRO partitions the states (the checkpoint's layout)",
    "zero_optimization.mics_hierarchical_params_gather": "how ZeRO partitions the states",
    "zero_optimization.zero_hpz_partition_size": "how ZeRO partitions the states",
    "pipeline": "the parallel layout (pipeline parallelism)",
}


# DeepSpeed's own monitors and its autotuner write files (and send metrics) where they choose.
DEEPSPEED_WRITERS = ("tensorboard", "wandb", "csv_monitor", "comet", "autotuning")
# A key that names a file or directory: flops_profiler.output_file, *.output_path, autotuning's results_dir, ...
DEEPSPEED_PATH_KEY = re.compile(r"(^|_)(path|paths|dir|dirs|file|files|folder)$")
# ZeRO-Infinity's NVMe swap directory is the user's to choose (a fast local disk), like the offload itself.
DEEPSPEED_USER_PATHS = ("nvme_path",)


def _deepspeed_leaves(settings: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of parallel.deepspeed (an empty dict is a leaf too)."""
    leaves = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            leaves += _deepspeed_leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def _deepspeed_refusal(key: str, value: Any, parallel: ParallelConfig, train: TrainConfig) -> str | None:
    """Why parallel.deepspeed may not hold key=value (None when it may)."""
    setting = f"parallel.deepspeed.{key}={json.dumps(value, default=str)}"
    owned = [k for k in DEEPSPEED_OWNED if key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.")]
    if owned:
        owner = DEEPSPEED_OWNED[owned[0]]
        section, name = owner.split(".")
        current = getattr({"parallel": parallel, "train": train}[section], name)
        fix = ("the pipeline writes and loads checkpoints itself (pipeline.checkpoint; universal loading follows "
               "train.resume): drop the key" if owner == "train.resume" else f"set {owner} instead")
        return (f"{setting} contradicts {owner}={current}: the pipeline derives DeepSpeed's {owned[0]} from it and "
                f"records, plans and checkpoints the run by it; {fix}.")
    unrecorded = [k for k in DEEPSPEED_UNRECORDED if key == k or key.startswith(f"{k}.")]
    if unrecorded:
        return (f"{setting} changes {DEEPSPEED_UNRECORDED[unrecorded[0]]} without the run recording it (its config, "
                f"plan and checkpoints would not describe what trained): the pipeline does not support it; drop the "
                f"key.")
    last = key.rsplit(".", 1)[-1]
    if key.split(".")[0] in DEEPSPEED_WRITERS or (DEEPSPEED_PATH_KEY.search(last) and last not in DEEPSPEED_USER_PATHS):
        return (f"{setting} would have DeepSpeed write files of its own: the pipeline logs metrics to MLflow "
                f"(tracking.*) and writes only below output_dir; drop the key.")
    return None


def validate_deepspeed(parallel: ParallelConfig, train: TrainConfig) -> None:
    """parallel.deepspeed holds expert settings only (buckets, overlap, offload of parameters, ...): nothing the
    pipeline sets itself, and nothing that makes DeepSpeed write files outside output_dir."""
    for key, value in _deepspeed_leaves(parallel.deepspeed):
        refusal = _deepspeed_refusal(key, value, parallel, train)
        if refusal:
            raise ConfigError(refusal)
