"""Checkpoints kept in the object store (cluster.storage_uri; pipeline.cluster.storage), for nodes that share no
file system: every node's first worker uploads its files, rank 0 the marker and `latest`; a node that lacks the
newest complete tag downloads it whole (marker last) before anything reads it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    TAG_PATTERN,
    CheckpointError,
    checkpoint_root,
    is_complete,
    latest_complete,
    verify_checkpoint,
)
from pipeline.cluster.storage import ObjectStore, StorageError, locked, run_rel
from pipeline.containment import tree_files
from pipeline.files import write_atomic

log = logging.getLogger(__name__)


def pull_checkpoint(store: ObjectStore, run_dir: Path, tag_dir: Path) -> bool:
    """Download one checkpoint tag (or universal tag) of the run unless this node holds it complete, then check
    every file's sha256 against its marker; a copy that fails is deleted (the next pull fetches it again) and
    CheckpointError names the file."""
    if is_complete(tag_dir):
        return False
    with locked(tag_dir):
        if is_complete(tag_dir):
            return False
        if not store.download_dir(run_rel(run_dir, tag_dir), tag_dir, COMPLETE_MARKER):
            return False
        try:
            verify_checkpoint(tag_dir, content=True)
        except CheckpointError as err:
            shutil.rmtree(tag_dir, ignore_errors=True)
            raise CheckpointError(f"the checkpoint downloaded from {store.path(run_rel(run_dir, tag_dir))} is damaged: "
                                  f"{err}") from err
        return True


def pull_latest_checkpoint(store: ObjectStore, run_dir: Path) -> Path | None:
    """Make the newest complete checkpoint the store knows for this run (its `latest`) present here, and
    `latest` name it locally when it is newer than this node's. Returns its local tag directory, if any."""
    root = checkpoint_root(Path(run_dir))
    tag = (store.read_text(run_rel(run_dir, root / LATEST_FILE)) or "").strip()
    if tag and TAG_PATTERN.fullmatch(tag) is None:
        raise StorageError(f"the object store's {store.shown_path(run_rel(run_dir, root / LATEST_FILE))} names "
                           f"{tag[:100]!r}, not a checkpoint tag: refusing it; write the tag's name (e.g. "
                           f"step_00000100) there")
    local = latest_complete(root)
    if not tag or (local is not None and local.name >= tag):
        return local
    if not pull_checkpoint(store, run_dir, root / tag) and not (root / tag).is_dir():
        log.warning("%s names %s, which the store does not hold complete", store.path(run_rel(run_dir, root)), tag)
        return local
    write_atomic(root / LATEST_FILE, tag)
    return root / tag


def push_checkpoint_files(store: ObjectStore, run_dir: Path, tag_dir: Path) -> int:
    """Upload the files of a checkpoint tag present on this node, except its marker."""
    names = set(tree_files(tag_dir, f"the checkpoint {tag_dir} holds", "a checkpoint holds only regular files: "
                           "remove it")) - {COMPLETE_MARKER}
    return store.upload_dir(tag_dir, run_rel(run_dir, tag_dir), only=names)


def push_checkpoint_marker(store: ObjectStore, run_dir: Path, tag_dir: Path, latest: bool = True) -> None:
    """After every node uploaded its files: the marker, then (for a training tag) `latest`."""
    rel = run_rel(run_dir, tag_dir)
    store.upload_dir(tag_dir, rel, marker=COMPLETE_MARKER, only=set())
    if latest:
        store.write_text(run_rel(run_dir, tag_dir.parent / LATEST_FILE), tag_dir.name)
