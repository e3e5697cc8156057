"""Saving and loading a DeepSpeed engine's sharded checkpoint, collectively, with every rank's RNG state.

A save counts only once every rank wrote its files: rank 0 then writes the COMPLETE marker and moves
`latest` (pipeline.checkpoint.layout). With an object store, each node's first worker then uploads its node's
files, in the background while training goes on, and rank 0 the marker once all are there
(pipeline.checkpoint.store_sync).

Every file is hashed while it is written (DeepSpeed's torch checkpoint engine writes through a hashing
stream; so do the RNG files), never by reading it back; rank 0 gathers the digests into the marker's
`sha256`, which `checkpoint inspect --verify` and a resume after a download check. Every rank scans the
pickles of what it is about to load (pipeline.checkpoint.pickles), not only the driver.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pipeline.checkpoint.async_write import ShardWriter, snapshot
from pipeline.checkpoint.layout import (
    CheckpointError,
    commit_locally,
    marker_file,
    prune_staging,
    read_marker,
    tag_for,
    verify_checkpoint,
)
from pipeline.checkpoint.pickles import check_pickles, safe_load, weights_only_loading
from pipeline.checkpoint.store_sync import CheckpointUploads, drop_checkpoint, upload_checkpoint
from pipeline.checkpoint.universal import repair_autotp_metadata
from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.containment import tree_files
from pipeline.files import fsync_files, no_space, sha256_file

log = logging.getLogger(__name__)

NO_UPLOADS = CheckpointUploads(NO_MIRROR, background=False)  # no object store: nothing to upload


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


_node_leader: bool | None = None  # set by mark_node_leader


def mark_node_leader() -> None:
    """Collective, once the process group is up: each node's lowest rank leads it (it downloads and uploads for
    its node). Nodes are told apart by their Ray node id under Ray (Ray Train's LOCAL_RANK groups workers by IP
    address, which two nodes can share, e.g. behind one NAT or on one machine) and by host name elsewhere."""
    global _node_leader
    ray = sys.modules.get("ray")
    key = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else socket.gethostname()
    keys: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    _node_leader = keys.index(key) == dist.get_rank()


def is_node_leader() -> bool:
    """Whether this rank is the first of its node (mark_node_leader; before it, LOCAL_RANK as Ray Train and
    torchrun set it, and without that rank 0 stands for the only node)."""
    if _node_leader is not None:
        return _node_leader
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


class _HashingWriter:
    """A binary file that hashes what goes through it (torch.save writes to any object with `write`)."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()
        self.error: OSError | None = None  # torch.save turns a failed write into a RuntimeError: kept here

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_hashed(obj: Any, path: Path | str, **kwargs: Any) -> str:
    """torch.save(obj, path), returning the sha256 of the bytes written (computed while writing). A full device
    raises NoSpaceError naming the file (the tag then never gets its marker: the previous checkpoint stays
    `latest`)."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer, **kwargs)
    except (OSError, RuntimeError) as err:
        cause = writer.error if writer is not None and writer.error is not None else err
        full = no_space(cause, Path(path)) if isinstance(cause, OSError) else None
        if full is not None:
            raise full from err
        raise
    return writer.digest.hexdigest()


class PipelineCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with every file hashed while it is written (`hashes`, by file name)
    and every file loaded weights-only with the allowed classes (pipeline.checkpoint.pickles). Plugged into each
    engine by install_checkpoint_engine."""

    def __init__(self, zipfile_serialization: bool):
        super().__init__(None)
        self.zipfile_serialization = zipfile_serialization
        self.hashes: dict[str, str] = {}
        self.writer: ShardWriter | None = None  # set for an asynchronous save (train.async_checkpoint)

    def save(self, state_dict, path: str) -> None:
        if isinstance(state_dict, dict) and "universal_checkpoint_info" in state_dict:
            state_dict = repair_autotp_metadata(state_dict)
        if self.writer is None:
            self.hashes[os.path.basename(path)] = save_hashed(state_dict, path,
                                                              _use_new_zipfile_serialization=self.zipfile_serialization)
            return
        writer = self.writer
        copy = snapshot(state_dict, writer.pool)  # the live tensors change at the next step: this copy is written

        def write() -> None:
            self.hashes[os.path.basename(path)] = save_hashed(copy, path,
                                                              _use_new_zipfile_serialization=self.zipfile_serialization)
            writer.pool.release(copy)

        writer.submit(write)

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def install_checkpoint_engine(engine) -> PipelineCheckpointEngine:
    """Plug PipelineCheckpointEngine into a DeepSpeed engine in place of the torch engine DeepSpeed built in
    initialize (keeping its serialization setting). Returns it."""
    current = engine.checkpoint_engine
    if isinstance(current, PipelineCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed chose the checkpoint engine {type(current).__name__}; the pipeline saves "
                              f"and loads through its own torch engine: remove the checkpoint writer settings from "
                              f"parallel.deepspeed")
    engine.checkpoint_engine = PipelineCheckpointEngine(current.zipfile_serialization)
    return engine.checkpoint_engine


def save_checkpoint(
    engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int, layout: dict[str, Any] | None = None,
    uploads: CheckpointUploads = NO_UPLOADS,
) -> Path:
    """Collective: every rank calls it. Returns the tag directory, committed (start_checkpoint, then its commit)."""
    return start_checkpoint(engine, root, step, client_state, keep_last, layout, uploads).commit()


def start_checkpoint(
    engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int, layout: dict[str, Any] | None = None,
    uploads: CheckpointUploads = NO_UPLOADS, writer: ShardWriter | None = None,
) -> PendingCheckpoint:
    """Collective: every rank calls it. Every rank writes its shards and RNG, hashed while written; with a
    `writer` (train.async_checkpoint) every rank copies them in memory and its writer thread writes them while
    training goes on. The returned PendingCheckpoint commits the tag. Without an object store rank 0 marks it
    complete (COMPLETE, `latest`) there. With one (`uploads`: the run's mirror, in the background or inline)
    the first rank of each node uploads its node's files, and rank 0 commits the checkpoint once every node's
    files are in the store: the marker and `latest` there, then here (upload_checkpoint); until then the run's
    previous checkpoint is the one to resume from, in the store and here alike.

        the last upload done -> clear the tag (a rewrite) -> every rank writes its shards and RNG (or copies
        them for its writer) -> [commit: the writes done on every rank -> rank 0's marker (every node's files:
        sizes, sha256s) -> committed (then or after the uploads) -> old tags pruned]"""
    if is_node_leader():
        uploads.wait()  # the store never holds two checkpoints in flight from one node
    tag_dir = root / tag_for(step)
    _clear_tag(tag_dir, uploads.mirror)
    _write_shards(engine, root, tag_dir, client_state, writer)
    return PendingCheckpoint(tag_dir, step, client_state, keep_last, layout, uploads, install_checkpoint_engine(engine),
                             writer)


@dataclass
class PendingCheckpoint:
    """A checkpoint whose files are written (or being written by the ranks' writers) and that is not committed:
    no COMPLETE marker, not `latest`."""

    tag_dir: Path
    step: int
    client_state: dict[str, Any]
    keep_last: int
    layout: dict[str, Any] | None
    uploads: CheckpointUploads
    engine: PipelineCheckpointEngine
    writer: ShardWriter | None

    def written_everywhere(self, device: torch.device) -> bool:
        """Collective (one all-reduce of a flag): whether every rank's writer has written all its files."""
        idle = torch.tensor([1.0 if self.writer is None or self.writer.idle() else 0.0], device=device)
        dist.all_reduce(idle, op=dist.ReduceOp.MIN)
        return bool(idle.item())

    def commit(self) -> Path:
        """Collective: wait for this rank's writes, then commit the tag as start_checkpoint describes."""
        mirror, rank, tag_dir = self.uploads.mirror, dist.get_rank(), self.tag_dir
        if self.writer is not None:
            self.writer.wait()
        gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(self.engine.hashes))
        hashes = dict(sorted({k: v for part in gathered for k, v in (part or {}).items()}.items()))
        files = _every_nodes_files(tag_dir)
        marker = _marker(self.step, self.client_state, self.layout, hashes, files) if rank == 0 else None
        if rank == 0 and not mirror.active:
            commit_locally(tag_dir, marker, self.keep_last)
        dist.barrier()
        if mirror.active and is_node_leader():
            if rank != 0:
                # Without a shared file system the other nodes' tags carry no marker (the store holds it): keep
                # only their newest few, which are staging copies of what is in the store.
                prune_staging(tag_dir.parent, self.uploads.keep_local or self.keep_last)
            self.uploads.start(partial(upload_checkpoint, mirror, tag_dir, marker, self.keep_last,
                                       self.uploads.keep_local))
        return tag_dir


def _every_nodes_files(tag_dir: Path) -> dict[str, int]:
    """Collective: {name: size} of every file of the tag on every node (each node's first rank lists its own)."""
    mine = {}
    if is_node_leader():
        names = tree_files(tag_dir, f"the checkpoint {tag_dir} holds", "a checkpoint holds only regular files: remove it")
        mine = {name: (tag_dir / name).stat().st_size for name in names}
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return dict(sorted({k: v for part in gathered for k, v in (part or {}).items()}.items()))


def _clear_tag(tag_dir: Path, mirror: Mirror) -> None:
    """Collective. A tag written before (a run resumed from an older checkpoint reaches this step again) is
    removed first, so that its COMPLETE marker cannot vouch for a half-written rewrite and no file of another
    layout stays behind in it; likewise in the store (uploads skip files already there at the same size)."""
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():
        log.info("rewriting checkpoint %s", tag_dir)
        shutil.rmtree(tag_dir, ignore_errors=True)  # on a shared disk other nodes' leaders remove it too
        if tag_dir.exists():
            shutil.rmtree(tag_dir)  # what is left is not a race: its error is the message
    elif mirror.active and is_node_leader() and tag_dir.exists():  # other nodes' copies, which they upload
        shutil.rmtree(tag_dir, ignore_errors=True)
    if rank == 0:
        drop_checkpoint(mirror, tag_dir)
    dist.barrier()


def _write_shards(engine, root: Path, tag_dir: Path, client_state: dict[str, Any],
                 writer: ShardWriter | None) -> None:
    """Collective: DeepSpeed writes this rank's shards (through PipelineCheckpointEngine, which hashes them; with a
    writer, copies them for it), then the rank's RNG file, flushed to stable storage; the digests are the
    checkpoint engine's `hashes` once written."""
    rank = dist.get_rank()
    if getattr(engine.module, "universal_checkpoint_info", None) is None:
        # ds_to_universal needs this key; under AutoTP DeepSpeed writes its own (which TP-sliced parameters
        # to merge and how), and a client_state key of the same name would overwrite it.
        client_state = {**client_state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
    checkpoint_engine = install_checkpoint_engine(engine)
    checkpoint_engine.hashes.clear()
    checkpoint_engine.writer = writer
    try:
        engine.save_checkpoint(str(root), tag=tag_dir.name, client_state=client_state, save_latest=False)
    finally:
        checkpoint_engine.writer = None
    rng, rng_file = rng_state(), tag_dir / f"rng_rank{rank}.pt"

    def finish() -> None:
        checkpoint_engine.hashes[rng_file.name] = save_hashed(rng, rng_file)
        fsync_files(tag_dir)

    if writer is None:
        finish()
    else:
        writer.submit(finish)


def _marker(step: int, client_state: dict[str, Any], layout: dict[str, Any] | None, hashes: dict[str, str],
            files: dict[str, int]) -> dict[str, Any]:
    """Rank 0: what the COMPLETE marker says of the checkpoint."""
    return {
        "step": step,
        "world_size": dist.get_world_size(),
        "saved_at": time.time(),
        # layout (ZeRO stage, tensor-parallel degree, precision) tells readers how to consolidate the shards.
        **(layout or {}),
        "client_state": {k: v for k, v in client_state.items() if k != "universal_checkpoint_info"},
        # Sizes of every file, so that a truncated or missing shard is named at load time (every node's files).
        "files": files,
        "sha256": hashes,  # of every file, as each rank computed it while writing
    }


def group_settings(optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (weight decay, betas, learning rate...), without its parameters."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def repair_zero3_universal_load(optimizer, settings: list[dict[str, Any]], scheduler) -> None:
    """Undo what DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    gets wrong, measured as the losses leaving the uninterrupted run's at the first step after an elastic resume:
    - it gives every parameter group the first group's settings ("the hyperparameters of each parameter should be
      the same"): the norms, biases and embeddings would decay as the matrices do, and under µP train at the
      matrices' learning rate. Each group gets its own back (`settings`, taken before the load), with the
      learning rate the loaded schedule had reached;
    - it hands one `step` tensor to every sub-group's state, and the fused AdamW counts it up in place once per
      sub-group: from the first step on, every sub-group but the first bias-corrects with a step count too high.
      Each gets its own copy."""
    last = scheduler.get_last_lr() if scheduler is not None else None
    for i, (group, own) in enumerate(zip(optimizer.param_groups, settings, strict=True)):
        group.update({key: value for key, value in own.items() if key not in ("params", "lr")})
        if last is not None:
            group["lr"] = last[i]
    for state in optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def load_checkpoint(engine, tag_dir: Path) -> dict[str, Any]:
    """Collective: load model, optimizer and scheduler state; restore this rank's RNG. Returns client_state.
    Before anything is unpickled, on whatever node it runs, every rank checks the files' sizes, scans the
    pickles, and hashes its share of the files (file i by rank i mod world): a changed byte anywhere is named
    on every rank before the first step."""
    marker = verify_checkpoint(tag_dir)
    check_pickles(tag_dir)
    digests = marker.get("sha256", {})
    names = sorted(digests)[dist.get_rank()::dist.get_world_size()]
    problems = [f"checkpoint file {tag_dir / name} fails its sha256 (its bytes changed after it was written): resume "
                f"from an older checkpoint (train.resume=<older tag>) or delete {tag_dir}"
                for name in names if sha256_file(marker_file(tag_dir, name)) != digests[name]]
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    found = [p for part in gathered for p in (part or [])]
    if found:
        raise CheckpointError(found[0] + (f" ({len(found) - 1} more files fail too)" if len(found) > 1 else ""))
    install_checkpoint_engine(engine)
    settings = group_settings(engine.optimizer)
    with weights_only_loading():  # also DeepSpeed's loads outside its engine (universal checkpoints)
        _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if engine.zero_optimization_stage() == 3 and engine.load_universal_checkpoint():
        repair_zero3_universal_load(engine.optimizer, settings, engine.lr_scheduler)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    if "step" not in client_state:  # e.g. a universal checkpoint: the marker keeps our state too
        client_state = read_marker(tag_dir)["client_state"]
    rng_file = tag_dir / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(safe_load(rng_file))
    return client_state
