"""Checkpoints in the run's mirror (pipeline.cluster.storage.Mirror; a no-op without cluster.storage_uri), for
nodes that share no file system: every node's first worker pushes its files, rank 0 the marker and `latest` once
every node's files are in the store; a node that lacks the newest complete tag pulls it whole (marker last) and
checks it before anything reads it.

Uploads run in the background (CheckpointUploads, cluster.background_uploads): training goes on while a
checkpoint's files go to the store, one checkpoint at a time per node (the next save waits for the last upload).
Rank 0 commits it once every node's files are there: the marker and `latest` in the store, then on its own node
(upload_checkpoint). Until then the previous checkpoint is the one to resume from, in the store and on every
node, so a kill during an upload leaves it in use. A node holds only its own files of a tag (is_whole tells): a
pull replaces such a copy with the whole tag.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    TAG_PATTERN,
    UNIVERSAL_DIR,
    CheckpointError,
    checkpoint_root,
    commit_locally,
    is_whole,
    latest_complete,
    named_tag_dir,
    verify_checkpoint,
)
from pipeline.cluster.storage import Mirror, StorageError
from pipeline.containment import tree_files
from pipeline.files import write_atomic

log = logging.getLogger(__name__)


def pull_checkpoint(mirror: Mirror, tag_dir: Path) -> bool:
    """Download one checkpoint tag (or universal tag) unless this node holds it whole (is_whole: a node of a
    cluster without a shared file system holds only its own files), then check every file's sha256 against its
    marker; a copy that fails is deleted (the next pull fetches it again) and CheckpointError names the file."""
    if not mirror.pull(tag_dir, COMPLETE_MARKER, present=lambda: is_whole(tag_dir)):
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
    if not tag or (local is not None and (local.name > tag or (local.name == tag and is_whole(local)))):
        return local  # nothing newer in the store, and this node holds its own newest whole
    if not pull_checkpoint(mirror, root / tag) and not (root / tag).is_dir():
        log.warning("%s names %s, which the store does not hold complete", mirror.shown_path(root), tag)
        return local
    write_atomic(root / LATEST_FILE, tag)
    return root / tag


def stored_tags(mirror: Mirror, root: Path) -> tuple[list[str], list[str]]:
    """The store's checkpoint tags below root: (complete ones, all of them), oldest first."""
    names = {tuple(name.split("/")) for name in mirror.listing(root)}
    every = sorted({parts[0] for parts in names if len(parts) >= 2 and TAG_PATTERN.fullmatch(parts[0])})
    complete = [tag for tag in every if (tag, COMPLETE_MARKER) in names]
    return complete, every


def prune_store(mirror: Mirror, root: Path, keep_last: int) -> list[str]:
    """The store keeps the run's newest keep_last complete checkpoints (0: all), as prune_old does on a disk:
    older ones go with their universal conversions, and so do incomplete tags older than the newest complete
    one (an upload cut short). Returns the tags deleted."""
    if not mirror.active:
        return []
    complete, every = stored_tags(mirror, root)
    if not complete:
        return []
    doomed = (complete[:-keep_last] if keep_last > 0 else []) + [
        tag for tag in every if tag not in complete and tag < complete[-1]]
    for tag in doomed:
        drop_checkpoint(mirror, root / tag)
        drop_checkpoint(mirror, root / UNIVERSAL_DIR / tag)
    return doomed


def pull_checkpoints(mirror: Mirror, run_dir: Path, which: str = "latest") -> None:
    """For the stages that read a trained run (evaluate, generate, export): the checkpoints `which` names present
    here (eval.checkpoint: latest; all, every tag complete in the store; or one tag, by name or directory)."""
    root = checkpoint_root(Path(run_dir))
    pull_latest_checkpoint(mirror, run_dir)
    if not mirror.active or which == "latest":
        return
    if which == "all":
        for tag in stored_tags(mirror, root)[0]:
            pull_checkpoint(mirror, root / tag)
        return
    tag_dir = named_tag_dir(root, which)
    if mirror.covers(tag_dir) and TAG_PATTERN.fullmatch(tag_dir.name):
        pull_checkpoint(mirror, tag_dir)


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


# How long rank 0 waits for the other nodes' files of a checkpoint to reach the store before it gives up on it.
ARRIVAL_TIMEOUT_S = 3600.0


def await_files(mirror: Mirror, tag_dir: Path, files: dict[str, int], timeout_s: float = ARRIVAL_TIMEOUT_S) -> None:
    """Until every file of `files` (name: size, every node's) is in the store at its size; StorageError naming
    those missing after timeout_s."""
    deadline, pause = time.monotonic() + timeout_s, 0.05
    while True:
        stored = mirror.listing(tag_dir)
        missing = sorted(name for name, size in files.items() if name != COMPLETE_MARKER and stored.get(name) != size)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise StorageError(f"{len(missing)} files of {mirror.shown_path(tag_dir)} never reached the store within "
                               f"{timeout_s:g} s (e.g. {missing[:3]}): the nodes that wrote them stopped uploading")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)


def upload_checkpoint(mirror: Mirror, tag_dir: Path, marker: dict[str, Any] | None = None,
                      keep_last: int = 0, keep_local: int = 0) -> None:
    """One node's share of a checkpoint's upload: its files. On rank 0 (`marker`: what COMPLETE says, every node's
    files and sizes) then the commit, once all of them are in the store: the marker and `latest` there, then here
    (commit_locally, which prunes this node's old tags down to keep_local, 0: keep_last), then the store's own
    old tags beyond keep_last (prune_store); so that the store and this node both always name a checkpoint
    complete in the store."""
    started = time.monotonic()
    copied = push_checkpoint_files(mirror, tag_dir)
    if marker is None:
        return
    await_files(mirror, tag_dir, marker["files"])
    root = tag_dir.parent
    pending = root / f".{tag_dir.name}.{COMPLETE_MARKER}.pending"
    write_atomic(pending, json.dumps(marker))
    try:
        mirror.push_file(pending, as_path=tag_dir / COMPLETE_MARKER)
    finally:
        pending.unlink(missing_ok=True)
    mirror.write_text(root / LATEST_FILE, tag_dir.name)
    commit_locally(tag_dir, marker, keep_local or keep_last)
    prune_store(mirror, root, keep_last)
    log.info("checkpoint %s is complete in %s (%d files from this node, %.1f s)", tag_dir.name, mirror.shown, copied,
             time.monotonic() - started)


class CheckpointUploads:
    """A process's checkpoint uploads to the run's mirror, in a background thread (`background`) or inline; one
    at a time: `start` first waits for the upload before it. `wait` joins the one in flight and raises its
    error (StorageError), if any. Without an object store nothing is uploaded. `keep_local`: the complete
    checkpoints this node keeps on its disk (cluster.local_checkpoints; 0: as many as the store)."""

    def __init__(self, mirror: Mirror, background: bool = True, keep_local: int = 0):
        self.mirror, self.background, self.keep_local = mirror, background, keep_local
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, work: Callable[[], None]) -> None:
        self.wait()
        if not self.mirror.active:
            return
        if not self.background:
            work()
            return

        def run() -> None:
            try:
                work()
            except BaseException as err:  # raised by the next wait (the next save, or the run's end)
                self._error = err

        # A daemon: a process that dies mid-upload leaves the store's previous complete checkpoint in use.
        self._thread = threading.Thread(target=run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, StorageError | CheckpointError):
                raise error
            raise StorageError(f"uploading a checkpoint to {self.mirror.shown} failed: {error}") from error
