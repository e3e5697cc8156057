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
    verify_checkpoint,
)
from pipeline.containment import ContainmentError, tree_files
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


def _reusable(out: Path, source_sha256: str) -> bool:
    """Whether an earlier conversion at `out` may be used: complete, made from a source whose COMPLETE marker had
    this sha256 (so from these very files), and every file below it, recursively, one its marker lists with the
    sha256 it had when the conversion wrote it (no file more, none changed, no link)."""
    if not is_complete(out):
        return False
    try:
        marker = read_marker(out)
        if marker.get("universal_source_sha256") != source_sha256:
            return False
        present = set(tree_files(out, f"the universal checkpoint {out} holds", "it is rebuilt")) - {COMPLETE_MARKER}
        if present != set(marker.get("sha256", {})):
            return False
        verify_checkpoint(out, content=True)
    except (CheckpointError, ContainmentError, FileNotFoundError) as err:
        log.warning("not reusing the universal conversion %s (%s): converting again", out, err)
        return False
    return True


def to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO checkpoint with DeepSpeed's ds_to_universal, in a subprocess whose loads are weights-only
    (`python -m pipeline.checkpoint.universal`). An earlier conversion is reused only when it was made from this
    checkpoint's files and is unchanged since (_reusable); anything else at its place is rebuilt."""
    out_root = tag_dir.parent / UNIVERSAL_DIR
    out = out_root / tag_dir.name
    source_sha256 = sha256_file(tag_dir / COMPLETE_MARKER)
    if _reusable(out, source_sha256):
        return out
    if out.is_symlink():
        out.unlink()
    shutil.rmtree(out, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.checkpoint.universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint for a new parallel layout", tag_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"DeepSpeed's universal conversion of {tag_dir} failed:\n{proc.stderr[-3000:]}")
    for rng in tag_dir.glob("rng_rank*.pt"):
        shutil.copy2(rng, out / rng.name)
    marker = read_marker(tag_dir)
    names = tree_files(out, f"the universal conversion {out} holds", "report this: the converter wrote a link")
    marker["files"] = {name: (out / name).stat().st_size for name in names}
    # DeepSpeed's converter wrote these files, not a hashing stream: hashed here once, from the local copy.
    marker["sha256"] = {name: sha256_file(out / name) for name in names}
    marker["universal_from"] = str(tag_dir)
    marker["universal_source_sha256"] = source_sha256
    write_atomic(out / COMPLETE_MARKER, json.dumps(marker))
    write_atomic(out_root / LATEST_FILE, out.name)
    return out


def convert_main(argv: list[str]) -> None:
    """DeepSpeed's ds_to_universal with every torch.load weights-only (the source was scanned before, and this
    is the second wall): run as `python -m pipeline.checkpoint.universal <ds_to_universal's arguments>`."""
    from deepspeed.checkpoint import ds_to_universal

    from pipeline.checkpoint.pickles import weights_only_loading

    sys.argv = ["ds_to_universal", *argv]
    args = ds_to_universal.parse_arguments()
    with weights_only_loading():
        ds_to_universal.main(args)


if __name__ == "__main__":
    convert_main(sys.argv[1:])
