"""Checkpoints in the run's mirror (pipeline.cluster.storage.Mirror; a no-op without cluster.storage_uri), for
nodes that share no file system: every node's first worker pushes its files, rank 0 the marker and `latest`; a
node that lacks the newest complete tag pulls it whole (marker last) and checks it before anything reads it."""

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
from pipeline.cluster.storage import Mirror, StorageError
from pipeline.containment import tree_files
from pipeline.files import write_atomic

log = logging.getLogger(__name__)


def pull_checkpoint(mirror: Mirror, tag_dir: Path) -> bool:
    """Download one checkpoint tag (or universal tag) unless this node holds it complete, then check every
    file's sha256 against its marker; a copy that fails is deleted (the next pull fetches it again) and
    CheckpointError names the file."""
    if not mirror.pull(tag_dir, COMPLETE_MARKER, present=lambda: is_complete(tag_dir)):
        return False
    try:
        verify_checkpoint(tag_dir, content=True)
    except CheckpointError as err:
        shutil.rmtree(tag_dir, ignore_errors=True)
        raise CheckpointError(f"the checkpoint downloaded from {mirror.shown_path(tag_dir)} is damaged: {err}") from err
    return True


def pull_latest_checkpoint(mirror: Mirror, run_dir: Path) -> Path | None:
    """Make the newest complete checkpoint the store knows for this run (its `latest`) present here, and
    `latest` name it locally when it is newer than this node's. Returns its local tag directory, if any."""
    root = checkpoint_root(Path(run_dir))
    local = latest_complete(root)
    if not mirror.active:
        return local
    tag = (mirror.read_text(root / LATEST_FILE) or "").strip()
    if tag and TAG_PATTERN.fullmatch(tag) is None:
        raise StorageError(f"the object store's {mirror.shown_path(root / LATEST_FILE)} names {tag[:100]!r}, not a "
                           f"checkpoint tag: refusing it; write the tag's name (e.g. step_00000100) there")
    if not tag or (local is not None and local.name >= tag):
        return local
    if not pull_checkpoint(mirror, root / tag) and not (root / tag).is_dir():
        log.warning("%s names %s, which the store does not hold complete", mirror.shown_path(root), tag)
        return local
    write_atomic(root / LATEST_FILE, tag)
    return root / tag


def push_checkpoint_files(mirror: Mirror, tag_dir: Path) -> int:
    """Upload the files of a checkpoint tag present on this node, except its marker."""
    if not mirror.active:
        return 0
    names = set(tree_files(tag_dir, f"the checkpoint {tag_dir} holds", "a checkpoint holds only regular files: "
                           "remove it")) - {COMPLETE_MARKER}
    return mirror.push(tag_dir, only=names)


def push_checkpoint_marker(mirror: Mirror, tag_dir: Path, latest: bool = True) -> None:
    """After every node uploaded its files: the marker, then (for a training tag) `latest`."""
    mirror.push(tag_dir, marker=COMPLETE_MARKER, only=set())
    if latest:
        mirror.write_text(tag_dir.parent / LATEST_FILE, tag_dir.name)


def push_checkpoint(mirror: Mirror, tag_dir: Path, latest: bool = True) -> None:
    """A checkpoint written whole on this node (a universal conversion): its files, then the marker."""
    push_checkpoint_files(mirror, tag_dir)
    push_checkpoint_marker(mirror, tag_dir, latest=latest)


def drop_checkpoint(mirror: Mirror, tag_dir: Path) -> None:
    """A pruned or rewritten tag, gone from the store too."""
    mirror.delete(tag_dir)
