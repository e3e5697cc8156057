"""Where checkpoints live and when one counts.

Layout: <run_dir>/checkpoints/<tag>/ holds DeepSpeed's shards, one rng_rank<r>.pt per rank and, last,
a COMPLETE marker written by rank 0 after a barrier. <run_dir>/checkpoints/latest names the newest
complete tag and moves (atomically) only after the marker exists; older complete tags beyond
keep_last are deleted after that. A crash while writing leaves the previous checkpoint as latest.
Universal conversions (pipeline.checkpoint.universal) sit in <run_dir>/checkpoints/universal/<tag>/.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import PipelineError
from pipeline.containment import ContainmentError, contained_file, is_regular_file, tree_files
from pipeline.files import sha256_file

log = logging.getLogger(__name__)


COMPLETE_MARKER = "COMPLETE"


LATEST_FILE = "latest"


UNIVERSAL_DIR = "universal"


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that is incomplete, truncated or damaged."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """No checkpoint where one is needed (a user error: the message says how to get one); still a
    FileNotFoundError for callers that look for a missing file."""


# What a checkpoint tag is called: `latest` may name nothing else.
TAG_PATTERN = re.compile(r"step_[0-9]{8,}")
# A COMPLETE marker is a few kilobytes per file it lists; a bigger one is not ours.
MAX_MARKER_BYTES = 64 << 20


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_tag_dir(path: Path) -> bool:
    """A checkpoint tag directory itself (not a link to one)."""
    return TAG_PATTERN.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def is_complete(tag_dir: Path) -> bool:
    return is_regular_file(tag_dir / COMPLETE_MARKER)


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_tag_dir(p) and is_complete(p))


def latest_complete(root: Path) -> Path | None:
    """The tag directory named by `latest` if complete, else the newest complete tag, else None."""
    latest = root / LATEST_FILE
    if is_regular_file(latest):
        with open(latest, "rb") as f:
            tag = f.read(200).decode(errors="replace").strip()
        if TAG_PATTERN.fullmatch(tag) is None:
            log.warning("%s names %r, not a checkpoint tag (step_<8 digits>): ignoring it; looking for the newest "
                        "complete checkpoint instead", latest, tag)
        elif is_tag_dir(root / tag) and is_complete(root / tag):
            return root / tag
        else:
            log.warning("%s names %s, which is not complete; looking for an older checkpoint", latest, tag)
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def require_latest(run_dir: Path) -> Path:
    """The run's latest complete checkpoint, or MissingCheckpoint saying how to get one."""
    root = checkpoint_root(run_dir)
    tag_dir = latest_complete(root)
    if tag_dir is None:
        raise MissingCheckpoint(
            f"no complete checkpoint in {root}: run `pipeline train` with the same overrides first "
            f"(run_name={run_dir.name})."
        )
    return tag_dir


def find_tag(path: Path) -> Path:
    """The checkpoint tag directory that path names: a tag itself, or the latest complete tag of a checkpoints
    directory or of a run directory."""
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        root = path
    elif checkpoint_root(path).is_dir():
        root = checkpoint_root(path)
    else:
        return path
    tag_dir = latest_complete(root)
    if tag_dir is None:
        raise CheckpointError(f"no complete checkpoint under {root}: pass a complete checkpoint tag directory, or "
                              f"train the run first")
    return tag_dir


def read_marker(tag_dir: Path) -> dict[str, Any]:
    marker = tag_dir / COMPLETE_MARKER
    if not is_complete(tag_dir):
        raise MissingCheckpoint(
            f"{tag_dir} is not a complete checkpoint (no {COMPLETE_MARKER} marker): it was interrupted while "
            f"being written; use an older checkpoint of {tag_dir.parent}."
        )
    fix = f"delete {tag_dir} or resume from another checkpoint"
    if marker.stat().st_size > MAX_MARKER_BYTES:
        raise CheckpointError(f"{marker} is {marker.stat().st_size} bytes, not a marker this pipeline writes: {fix}")
    try:
        data = json.loads(marker.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{marker} is not valid JSON ({type(err).__name__}): {fix}") from err
    files, digests = (data.get("files", {}), data.get("sha256", {})) if isinstance(data, dict) else (None, None)
    if (not isinstance(data, dict) or not isinstance(files, dict) or not isinstance(digests, dict)
            or not all(isinstance(v, int) and v >= 0 for v in files.values())
            or not all(isinstance(v, str) for v in digests.values())):
        raise CheckpointError(f"{marker} does not describe a checkpoint (files with sizes, sha256 digests): {fix}")
    _check_marker_fields(data, marker, fix)
    return data


def _check_marker_fields(data: dict[str, Any], marker: Path, fix: str) -> None:
    """The marker's numbers and client state have the types and ranges the pipeline writes (a crafted marker must
    give this message, not a traceback deep in the resume)."""
    def count(key: str, low: int, high: int | None = None, required: bool = False) -> None:
        value = data.get(key)
        if value is None and not required:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            raise CheckpointError(f"{marker} holds {key}={value!r}, which no checkpoint of this pipeline has: {fix}")

    count("step", 0, required=True)
    count("world_size", 1, required=True)
    count("tensor_parallel", 1)
    count("zero_stage", 0, 3)
    state = data.get("client_state", {})
    if not isinstance(state, dict) or not isinstance(state.get("math_config", {}), (dict, type(None))):
        raise CheckpointError(f"{marker} holds a client_state that is not the pipeline's (a mapping, its math_config "
                              f"a mapping): {fix}")


def marker_file(tag_dir: Path, name: str) -> Path:
    """The file a COMPLETE marker names, contained in its tag directory and a regular file (CheckpointError
    otherwise: a crafted marker must not make `--verify` read a device or a file outside the checkpoint)."""
    try:
        return contained_file(tag_dir, name, f"the {COMPLETE_MARKER} marker of {tag_dir} names the file",
                              f"a checkpoint names only its own files; delete {tag_dir} or resume from another "
                              f"checkpoint")
    except ContainmentError as err:
        raise CheckpointError(str(err)) from err


def verify_checkpoint(tag_dir: Path, content: bool = False) -> dict[str, Any]:
    """The COMPLETE marker of tag_dir after checking that every file it lists is there at its size, and with
    `content` that every file's sha256 is the one recorded while it was written (the marker's `sha256`)."""
    marker = read_marker(tag_dir)
    for name, size in marker.get("files", {}).items():
        try:
            path = marker_file(tag_dir, name)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {tag_dir / name} is missing: resume from an older checkpoint of "
                                  f"{tag_dir.parent}") from None
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {path} is {'truncated' if actual < size else 'changed'} ({actual} bytes, written "
                f"as {size}): resume from an older checkpoint (train.resume=<older tag>) or delete {tag_dir}"
            )
    if content:
        for name, expected in marker.get("sha256", {}).items():
            if sha256_file(marker_file(tag_dir, name)) != expected:
                raise CheckpointError(
                    f"checkpoint file {tag_dir / name} fails its sha256 (its bytes changed after it was written): "
                    f"resume from an older checkpoint (train.resume=<older tag>) or delete {tag_dir}"
                )
    return marker


def is_whole(tag_dir: Path) -> bool:
    """Whether tag_dir is complete here: its marker and every file it lists at its size (on nodes that share no
    file system a node holds only its own files of a tag complete in the store)."""
    if not is_complete(tag_dir):
        return False
    try:
        verify_checkpoint(tag_dir)
    except CheckpointError:
        return False
    return True


def named_tag_dir(root: Path, which: str) -> Path:
    """The tag directory eval.checkpoint names when it names one: a directory (absolute, or a relative path), or a
    tag's name below the run's checkpoint root."""
    return Path(which) if Path(which).is_absolute() or "/" in which else Path(root) / which


def commit_locally(tag_dir: Path, marker: dict[str, Any], keep_last: int) -> list[str]:
    """The end of a save: the COMPLETE marker (it vouches for every file, so it comes last), `latest`, then the
    old tags pruned (prune_old). Returns the pruned tags."""
    from pipeline.files import write_atomic

    write_atomic(tag_dir / COMPLETE_MARKER, json.dumps(marker))
    write_atomic(tag_dir.parent / LATEST_FILE, tag_dir.name)
    return prune_old(tag_dir.parent, keep_last)


def prune_old(root: Path, keep_last: int) -> list[str]:
    """Keep the last `keep_last` complete checkpoints (0: all). Delete older ones, their universal
    conversions, and incomplete tags older than the newest complete one (left by a crash while writing)."""
    complete = complete_tags(root)
    if not complete:
        return []
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [p.name for p in root.iterdir() if is_tag_dir(p) and not is_complete(p) and p.name < complete[-1]]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / UNIVERSAL_DIR / tag, ignore_errors=True)
        log.info("deleted old checkpoint %s (keeping the last %d complete ones)", tag, keep_last)
    return doomed


def prune_staging(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest keep_last checkpoint tags (0: keep all) of root, complete or not."""
    tags = sorted(p.name for p in root.iterdir() if is_tag_dir(p)) if root.is_dir() else []
    doomed = tags[:-keep_last] if keep_last > 0 else []
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def fork_checkpoint(tag_dir: Path, run_dir: Path) -> Path:
    """Another run's complete checkpoint as a checkpoint of run_dir, to resume from (a WSD decay branch starts
    from its trunk's stable phase). Files are hard links where the file system allows (checkpoint files are
    never rewritten, only deleted, so the runs cannot disturb each other), else copies; the copy becomes a tag
    of run_dir only once whole, so a kill mid-fork leaves nothing that counts."""
    if not is_complete(tag_dir):
        raise CheckpointError(f"cannot fork {tag_dir}: it is not a complete checkpoint")
    tree_files(tag_dir, f"the checkpoint {tag_dir} holds", "a checkpoint holds only regular files; fork another")
    root = checkpoint_root(run_dir)
    dest = root / tag_dir.name
    source_marker = (tag_dir / COMPLETE_MARKER).read_bytes()
    if is_complete(dest) and (dest / COMPLETE_MARKER).read_bytes() == source_marker:
        return dest  # forked before from this very checkpoint (its marker lists every file's sha256)
    partial = root / f".fork-{tag_dir.name}"
    shutil.rmtree(partial, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            Path(dst).hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(tag_dir, partial, copy_function=link_or_copy)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest
