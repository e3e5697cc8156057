"""Elastic resume: which layout changes DeepSpeed can load, and the conversion to a universal checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    UNIVERSAL_DIR,
    CheckpointError,
    is_complete,
    read_marker,
)
from pipeline.files import sha256_file, write_atomic

log = logging.getLogger(__name__)


def zero_stage_change_supported(saved_stage: int, zero_stage: int) -> bool:
    """Whether DeepSpeed resumes a checkpoint of saved_stage at zero_stage. Through the universal checkpoint
    stages 1 and 2 interchange (exactly, in fp32); 0 -> 1, 1 -> 0, 1 -> 3 and 3 -> 1 fail (DeepSpeed 0.19.8:
    ZeRO-0 has no optimizer shards to convert, and ZeRO-3 partitions the weights themselves)."""
    return saved_stage == zero_stage or {saved_stage, zero_stage} <= {1, 2}


def needs_universal(marker: dict[str, Any], world_size: int, tensor_parallel: int, zero_stage: int) -> bool:
    """Whether loading this checkpoint at the given layout needs DeepSpeed's universal conversion: ZeRO
    shards the optimizer state by data-parallel rank, so another data-parallel size (or stage) cannot load
    the shards directly. Without ZeRO the state is replicated and loads at any data-parallel size."""
    saved_dp = marker["world_size"] // marker.get("tensor_parallel", 1)
    dp = world_size // tensor_parallel
    saved_stage = marker.get("zero_stage", 0)
    if marker.get("tensor_parallel", 1) != tensor_parallel:
        return True
    if saved_stage == 0 and zero_stage == 0:
        return False
    return saved_dp != dp or saved_stage != zero_stage


def to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO checkpoint with `python -m deepspeed.checkpoint.ds_to_universal` (once; reused)."""
    out_root = tag_dir.parent / UNIVERSAL_DIR
    out = out_root / tag_dir.name
    if is_complete(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint for a new parallel layout", tag_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"DeepSpeed's universal conversion of {tag_dir} failed:\n{proc.stderr[-3000:]}")
    for rng in tag_dir.glob("rng_rank*.pt"):
        shutil.copy2(rng, out / rng.name)
    marker = read_marker(tag_dir)
    marker["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    # DeepSpeed's converter wrote these files, not a hashing stream: hashed here once, from the local copy.
    marker["sha256"] = {name: sha256_file(out / name) for name in marker["files"]}
    marker["universal_from"] = str(tag_dir)
    write_atomic(out / COMPLETE_MARKER, json.dumps(marker))
    write_atomic(out_root / LATEST_FILE, out.name)
    return out
