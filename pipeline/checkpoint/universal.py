"""Elastic resume: which layout changes DeepSpeed can load, and the conversion to a universal checkpoint."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    UNIVERSAL_DIR,
    CheckpointError,
    checkpoint_root,
    is_complete,
    read_marker,
    verify_checkpoint,
)
from pipeline.containment import ContainmentError, contained, tree_files
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


def repair_autotp_metadata(state: dict) -> dict:
    """A model-states dict whose AutoTP conversion metadata describes every TP-replicated parameter by its real shape.

    DeepSpeed 0.19.8 records the affine map of a parameter AutoTP left whole (embeddings, norms) from
    `param.shape`, which under ZeRO-3 is the empty placeholder: the map says such a parameter has 0 elements,
    and ds_to_universal then refuses the run's own checkpoint ("Rank 0 supplied a shard of 32 elements, but the
    map describes 0"). The shape ZeRO-3 saved beside it (`param_shapes`) is the parameter's whole shape, and a
    replicated parameter's map is the same on every tensor-parallel rank: rebuilt from it here, at save time,
    so the files on disk are ones DeepSpeed's converter reads. Anything else is left as it is."""
    info = state.get("universal_checkpoint_info") or {}
    maps = (info.get("affine_map") or {}).get("params") or {}
    shapes = {name: tuple(shape) for group in state.get("param_shapes") or [] for name, shape in group.items()}
    tp = (state.get("checkpoint_parallel_dimensions") or {}).get("tp_degree", 1)
    replicated = set(info.get("tp_replicated_parameter_patterns") or [])
    for pattern, entry in maps.items():
        if pattern not in replicated or math.prod(entry.get("logical_shape") or [0]) != 0:
            continue
        match = [shape for name, shape in shapes.items() if re.match(pattern, name)]
        if len(match) == 1 and math.prod(match[0]):
            from deepspeed.checkpoint.affine import replicated_map

            maps[pattern] = replicated_map(match[0], tp).to_dict()
    return state


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


# A parameter's name as a module path: the converter makes it a directory name below its output.
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _names_in(state: dict) -> list:
    """Every parameter or buffer name a model-states file holds (what ds_to_universal turns into paths)."""
    names = list(state.get("module") or {})
    for shapes in [*(state.get("param_shapes") or []), *(state.get("frozen_param_shapes") or [])]:
        names += list(shapes) if isinstance(shapes, dict) else [shapes]
    names += list(state.get("buffer_names") or [])
    shared = state.get("shared_params") or {}
    names += [*shared, *shared.values()] if isinstance(shared, dict) else [shared]
    return names


def check_parameter_names(tag_dir: Path) -> None:
    """Refuse a checkpoint whose model-states files name a parameter that is not a module path (`a.b_1.weight`):
    DeepSpeed's converter writes each parameter's state under `<output>/zero/<name>/`, so a crafted name (`../..`,
    an absolute path) would make it write anywhere. Read weights-only and memory-mapped: names, not tensors."""
    from pipeline.checkpoint.pickles import weights_only_loading

    for path in sorted(tag_dir.glob("*model_states.pt")):
        with weights_only_loading():
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        bad = [name for name in _names_in(state) if not isinstance(name, str) or not PARAMETER_NAME.fullmatch(name)]
        if bad:
            raise CheckpointError(f"checkpoint file {path} names the parameter {str(bad[0])[:200]!r}, which is not a "
                                  f"module path (letters, digits, _ and dots): the converter would write outside its "
                                  f"output; this checkpoint was not written by DeepSpeed as is: resume from another")


def to_universal(tag_dir: Path, run_dir: Path | None = None) -> Path:
    """Convert a ZeRO checkpoint with DeepSpeed's ds_to_universal, in a subprocess whose loads are weights-only
    (`python -m pipeline.checkpoint.universal`), into <run_dir>/checkpoints/universal/<tag> (run_dir: the run
    resuming; by default the checkpoint's own run): never beside a checkpoint of another run. An earlier
    conversion is reused only when it was made from this checkpoint's files and is unchanged since (_reusable);
    anything else at its place is rebuilt. The source's bytes are checked against its marker first."""
    run_dir = Path(run_dir) if run_dir is not None else tag_dir.parent.parent
    root = checkpoint_root(run_dir)
    try:
        out = contained(root, f"{UNIVERSAL_DIR}/{tag_dir.name}", "the universal conversion's directory",
                        f"remove the link from {root}")
    except ContainmentError as err:
        raise CheckpointError(str(err)) from err
    out_root = out.parent
    source_sha256 = sha256_file(tag_dir / COMPLETE_MARKER)
    if _reusable(out, source_sha256):
        return out
    verify_checkpoint(tag_dir, content=True)  # a changed byte is named here, not converted into the new layout
    check_parameter_names(tag_dir)
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
    wrap_plain_states(Path(args.output_folder))


def wrap_plain_states(out: Path) -> None:
    """Give every state file of a universal checkpoint the form {"param": tensor}. DeepSpeed 0.19.8's converter
    writes a ZeRO-3 checkpoint saved without tensor parallelism as bare tensors, and its ZeRO-3 loader cuts a
    tensor-parallel rank's slice out of the whole weight only from that form: resuming such a checkpoint at
    parallel.tensor_parallel > 1 failed ("start (4096) + length (512) exceeds dimension size (4096)")."""
    for path in sorted(p for p in (out / "zero").glob("*/*.pt") if p.stem in ("fp32", "exp_avg", "exp_avg_sq")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, torch.Tensor):
            torch.save({"param": state}, path)


if __name__ == "__main__":
    convert_main(sys.argv[1:])
