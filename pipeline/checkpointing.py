"""Sharded DeepSpeed checkpoints that count only once every rank has written them.

Layout: <run_dir>/checkpoints/<tag>/ holds DeepSpeed's shards, one rng_rank<r>.pt per rank and, last,
a COMPLETE marker written by rank 0 after a barrier. <run_dir>/checkpoints/latest names the newest
complete tag and moves (atomically) only after the marker exists; older complete tags beyond
keep_last are deleted after that. A crash while writing leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import PipelineError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_MARKER).is_file()


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p))


def latest_complete(root: Path) -> Path | None:
    """The tag directory named by `latest` if complete, else the newest complete tag, else None."""
    latest = root / LATEST_FILE
    if latest.is_file():
        tag_dir = root / latest.read_text().strip()
        if is_complete(tag_dir):
            return tag_dir
        log.warning("%s names %s, which is not complete; looking for an older checkpoint", latest, tag_dir.name)
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every RNG of this rank as plain tensors and numbers, so it loads with torch.load(weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python_version": version,
        "python_state": torch.tensor(mt_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int, layout: dict[str, Any] | None = None,
    store=None,
) -> Path:
    """Collective: every rank calls it. Returns the tag directory. With `store` (pipeline.storage.ObjectStore)
    the first rank of each node uploads its node's files, then rank 0 the marker and `latest`."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():
        # A tag written before (a run resumed from an older checkpoint reaches this step again): remove it
        # first, so that its COMPLETE marker cannot vouch for a half-written rewrite and no file of another
        # layout stays behind in it.
        log.info("rewriting checkpoint %s", tag_dir)
        shutil.rmtree(tag_dir)
    elif store is not None and is_node_leader() and tag_dir.exists():  # other nodes' copies, which they upload
        shutil.rmtree(tag_dir, ignore_errors=True)
    if rank == 0 and store is not None:
        from pipeline.storage import run_rel

        # Likewise in the store (uploads skip files already there at the same size).
        store.delete_dir(run_rel(root.parent, tag_dir))
    dist.barrier()
    if getattr(engine.module, "universal_checkpoint_info", None) is None:
        # ds_to_universal needs this key; under AutoTP DeepSpeed writes its own (which TP-sliced parameters
        # to merge and how), and a client_state key of the same name would overwrite it.
        client_state = {**client_state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    _fsync_files(tag_dir)
    dist.barrier()
    if store is not None:
        from pipeline.storage import push_checkpoint_files, run_rel

        if is_node_leader():
            push_checkpoint_files(store, root.parent, tag_dir)
        dist.barrier()
    if rank == 0:
        # layout (ZeRO stage, tensor-parallel degree, precision) tells readers how to consolidate the shards.
        marker = {
            "step": step,
            "world_size": dist.get_world_size(),
            "saved_at": time.time(),
            **(layout or {}),
            "client_state": {k: v for k, v in client_state.items() if k != "universal_checkpoint_info"},
            # Sizes of every file, so that a truncated or missing shard is named at load time (with a store:
            # every node's files, as uploaded).
            "files": ({p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()} if store is None
                      else dict(sorted(store.files(run_rel(root.parent, tag_dir)).items()))),
        }
        _atomic_write(tag_dir / COMPLETE_MARKER, json.dumps(marker))
        _atomic_write(root / LATEST_FILE, tag)
        if store is not None:
            from pipeline.storage import push_checkpoint_marker

            push_checkpoint_marker(store, root.parent, tag_dir)
        for old_tag in _prune(root, keep_last):
            if store is not None:
                store.delete_dir(run_rel(root.parent, root / old_tag))
                store.delete_dir(run_rel(root.parent, root / UNIVERSAL_DIR / old_tag))
    dist.barrier()
    if store is not None and rank != 0 and is_node_leader():
        # Without a shared file system the other nodes' tags carry no marker (the store holds it): keep
        # only their newest keep_last, which are staging copies of what is in the store.
        prune_staging(root, keep_last)
    return tag_dir


def prune_staging(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest keep_last checkpoint tags (0: keep all) of root, complete or not."""
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")) if root.is_dir() else []
    doomed = tags[:-keep_last] if keep_last > 0 else []
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def _fsync_files(tag_dir: Path) -> None:
    """Flush every file of the tag to stable storage before the marker vouches for them. Each rank runs it
    (on a shared file system a rank can only flush what its own node wrote); files already on disk cost
    little."""
    for path in [*(p for p in tag_dir.iterdir() if p.is_file()), tag_dir]:  # the directory: its new entries
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_node_leader() -> bool:
    """Whether this rank is the first of its node (LOCAL_RANK, set by Ray Train and torchrun; without it,
    rank 0 stands for the only node)."""
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


def _prune(root: Path, keep_last: int) -> list[str]:
    """Keep the last `keep_last` complete checkpoints (0: all). Delete older ones, their universal
    conversions, and incomplete tags older than the newest complete one (left by a crash while writing)."""
    complete = complete_tags(root)
    if not complete:
        return []
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
               and not is_complete(p) and p.name < complete[-1]]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / UNIVERSAL_DIR / tag, ignore_errors=True)
        log.info("deleted old checkpoint %s (keeping the last %d complete ones)", tag, keep_last)
    return doomed


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that is incomplete, truncated or damaged."""


def verify_checkpoint(tag_dir: Path) -> dict[str, Any]:
    """The COMPLETE marker of tag_dir after checking that every file it lists is there at its size."""
    marker = read_marker(tag_dir)
    for name, size in marker.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing: resume from an older checkpoint of {tag_dir.parent}")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {path} is {'truncated' if actual < size else 'changed'} ({actual} bytes, written "
                f"as {size}): resume from an older checkpoint (train.resume=<older tag>) or delete {tag_dir}"
            )
    return marker


# Environment variable naming further Python globals (module.Name, comma-separated) that a checkpoint the
# user trusts may pickle, e.g. one written by another DeepSpeed version.
TRUSTED_GLOBALS_ENV = "PIPELINE_TRUSTED_PICKLE_GLOBALS"


def _deepspeed_pickle_classes() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_pickles(tag_dir: Path) -> None:
    """Refuse a checkpoint whose pickles name any Python global beyond tensors, plain data and DeepSpeed's
    own state classes, before anything unpickles it: DeepSpeed's loaders use torch.load(weights_only=False),
    and a crafted file runs code on load. Scanning reads only the pickles, not the tensor data."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_pickle_classes()}
    allowed |= {name.strip() for name in os.environ.get(TRUSTED_GLOBALS_ENV, "").split(",") if name.strip()}
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
        except Exception as err:  # not a torch.save zip file at all
            raise CheckpointError(f"checkpoint file {path} is not a readable torch file ({err}): resume from "
                                  f"another checkpoint") from err
        if unknown:
            raise CheckpointError(
                f"checkpoint file {path} pickles Python objects this pipeline does not write ({', '.join(unknown)}); "
                f"loading it could run arbitrary code, so it is refused. If you trust its source, allow them with "
                f"{TRUSTED_GLOBALS_ENV}={','.join(unknown)}."
            )


def load_checkpoint(engine, tag_dir: Path) -> dict[str, Any]:
    """Collective: load model, optimizer and scheduler state; restore this rank's RNG. Returns client_state."""
    verify_checkpoint(tag_dir)
    _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    if "step" not in client_state:  # e.g. a universal checkpoint: the marker keeps our state too
        client_state = read_marker(tag_dir)["client_state"]
    rng_file = tag_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def read_marker(tag_dir: Path) -> dict[str, Any]:
    marker = tag_dir / COMPLETE_MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{tag_dir} is not a complete checkpoint (no {COMPLETE_MARKER} marker): it was interrupted while "
            f"being written; use an older checkpoint of {tag_dir.parent}."
        )
    return json.loads(marker.read_text())


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a sharded checkpoint, in one process (no distributed setup)."""
    marker = verify_checkpoint(tag_dir)
    check_pickles(tag_dir)
    tp = marker.get("tensor_parallel", 1)
    if tp > 1:
        return _merge_tensor_parallel(tag_dir, tp)
    if marker.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = _load_model_states(tag_dir, 0)
    return {k: v.float() for k, v in state.items()}


def _load_model_states(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    path = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} is missing: the checkpoint is incomplete or damaged.")
    with torch.serialization.safe_globals(_deepspeed_pickle_classes()):
        return torch.load(path, map_location="cpu", weights_only=True)["module"]


def _merge_tensor_parallel(tag_dir: Path, tp: int) -> dict[str, torch.Tensor]:
    """Undo AutoTP's sharding (see pipeline.ds_config.AUTOTP_LAYER_SPECS): column layers split their output
    rows (weight and bias), row layers split their input columns (their bias is replicated)."""
    import re

    from pipeline.ds_config import AUTOTP_LAYER_SPECS

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


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> current' for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint tag directory that train.resume names (auto: the latest complete one, if any)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_complete(root)
    tag_dir = Path(resume)
    if (checkpoint_root(tag_dir) / LATEST_FILE).is_file():  # a run directory
        tag_dir = checkpoint_root(tag_dir)
    if (tag_dir / LATEST_FILE).is_file():  # a checkpoints directory rather than a tag
        tag_dir = latest_complete(tag_dir)
        if tag_dir is None:
            raise CheckpointError(f"train.resume={resume} holds no complete checkpoint: pass a complete one or "
                                  f"train.resume=none")
    read_marker(tag_dir)
    return tag_dir


UNIVERSAL_DIR = "universal"


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
    import subprocess
    import sys

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
    marker["universal_from"] = str(tag_dir)
    _atomic_write(out / COMPLETE_MARKER, json.dumps(marker))
    _atomic_write(out_root / LATEST_FILE, out.name)
    return out
