"""Full fp32 weights from a sharded checkpoint, in one process: DeepSpeed's zero_to_fp32 for ZeRO (per
tensor-parallel rank under ZeRO-3), AutoTP shards concatenated back (pipeline.model.tensor_parallel says which layers split how)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from pipeline.checkpoint.layout import MissingCheckpoint, verify_checkpoint
from pipeline.checkpoint.pickles import check_pickles, safe_load, weights_only_loading
from pipeline.model.tensor_parallel import AUTOTP_LAYER_SPECS


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a sharded checkpoint, in one process (no distributed setup)."""
    marker = verify_checkpoint(tag_dir)
    check_pickles(tag_dir)
    tp, stage = marker.get("tensor_parallel", 1), marker.get("zero_stage", 0)
    if tp > 1:
        if stage == 3:  # every tensor-parallel rank's slice is itself partitioned over the data-parallel ranks
            return _merge_tensor_parallel([_zero_state(tag_dir, mp_rank) for mp_rank in range(tp)])
        return _merge_tensor_parallel([_load_model_states(tag_dir, mp_rank) for mp_rank in range(tp)])
    if stage >= 1:
        return _zero_state(tag_dir, None)
    return {k: v.float() for k, v in _load_model_states(tag_dir, 0).items()}


def _zero_state(tag_dir: Path, mp_rank: int | None) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 over the ZeRO shards of one tensor-parallel rank (None: a run without tensor
    parallelism, all of them). zero_to_fp32 reads every shard of the directory it is given, so one rank's
    shards are linked into a directory of their own (ZeRO-3 names them zero_pp_rank_<dp>_mp_rank_<tp>_*)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loading(), tempfile.TemporaryDirectory(prefix="consolidate-") as tmp:
        if mp_rank is None:
            source, tag = tag_dir.parent, tag_dir.name
        else:
            source, tag = Path(tmp), "rank"
            (source / tag).mkdir()
            files = sorted(tag_dir.glob(f"zero_pp_rank_*_mp_rank_{mp_rank:02d}_*_states.pt"))
            if not files:
                raise MissingCheckpoint(f"{tag_dir} holds no ZeRO-3 shard of tensor-parallel rank {mp_rank}: the "
                                        f"checkpoint is incomplete or damaged.")
            for file in files:
                (source / tag / file.name).symlink_to(file.resolve())
        # DeepSpeed's zero_to_fp32 asks torch.load for weights_only=False: weights_only_loading answers
        state = get_fp32_state_dict_from_zero_checkpoint(str(source), tag=tag)
    return {k: v.float() for k, v in state.items()}


def _load_model_states(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    path = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise MissingCheckpoint(f"checkpoint shard {path} is missing: the checkpoint is incomplete or damaged.")
    return safe_load(path, map_location="cpu")["module"]


def _merge_tensor_parallel(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Undo AutoTP's sharding of the tensor-parallel ranks' weights, in rank order (see
    pipeline.model.tensor_parallel.AUTOTP_LAYER_SPECS): column layers split their output rows (weight and bias), row
    layers split their input columns (their bias is replicated). A replicated weight is read from the first rank:
    under ZeRO-3 only that rank's files name the output head's tie to the embedding."""
    row = [re.compile(p) for spec in AUTOTP_LAYER_SPECS if spec["partition_type"] == "row" for p in spec["patterns"]]
    col = [re.compile(p) for spec in AUTOTP_LAYER_SPECS if spec["partition_type"] == "column" for p in spec["patterns"]]
    merged = {}
    for name, first in shards[0].items():
        weight_name = name[: -len(".bias")] + ".weight" if name.endswith(".bias") else name
        if any(p.match(weight_name) for p in col):
            merged[name] = torch.cat([s[name].float() for s in shards], dim=0)
        elif any(p.match(name) for p in row):
            merged[name] = torch.cat([s[name].float() for s in shards], dim=1)
        else:
            merged[name] = first.float()
    return merged
