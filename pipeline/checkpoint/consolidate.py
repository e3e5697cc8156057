"""Full fp32 weights from a sharded checkpoint, in one process: DeepSpeed's zero_to_fp32 for ZeRO, AutoTP
shards concatenated back (pipeline.model.tensor_parallel says which layers split how)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline.checkpoint.layout import MissingCheckpoint, verify_checkpoint
from pipeline.checkpoint.pickles import check_pickles, safe_load, weights_only_loading
from pipeline.model.tensor_parallel import AUTOTP_LAYER_SPECS


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a sharded checkpoint, in one process (no distributed setup)."""
    marker = verify_checkpoint(tag_dir)
    check_pickles(tag_dir)
    tp = marker.get("tensor_parallel", 1)
    if tp > 1:
        return _merge_tensor_parallel(tag_dir, tp)
    if marker.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loading():  # DeepSpeed's zero_to_fp32 asks torch.load for weights_only=False
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = _load_model_states(tag_dir, 0)
    return {k: v.float() for k, v in state.items()}


def _load_model_states(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    path = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise MissingCheckpoint(f"checkpoint shard {path} is missing: the checkpoint is incomplete or damaged.")
    return safe_load(path, map_location="cpu")["module"]


def _merge_tensor_parallel(tag_dir: Path, tp: int) -> dict[str, torch.Tensor]:
    """Undo AutoTP's sharding (see pipeline.model.tensor_parallel.AUTOTP_LAYER_SPECS): column layers split their output
    rows (weight and bias), row layers split their input columns (their bias is replicated)."""
    shards = [_load_model_states(tag_dir, r) for r in range(tp)]
    row = [re.compile(p) for spec in AUTOTP_LAYER_SPECS if spec["partition_type"] == "row" for p in spec["patterns"]]
    col = [re.compile(p) for spec in AUTOTP_LAYER_SPECS if spec["partition_type"] == "column" for p in spec["patterns"]]
    merged = {}
    for name, first in shards[0].items():
        weight_name = name[: -len(".bias")] + ".weight" if name.endswith(".bias") else name
        parts = [s[name].float() for s in shards]
        if any(p.match(weight_name) for p in col):
            merged[name] = torch.cat(parts, dim=0)
        elif any(p.match(name) for p in row):
            merged[name] = torch.cat(parts, dim=1)
        else:
            merged[name] = first.float()
    return merged
