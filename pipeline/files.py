"""Durable files on the local file system: whole-or-nothing writes, flushing to stable storage, and a lock
that serialises the processes of one machine on a directory.

Shards, manifests, journals, checkpoint markers and downloads all go through these three helpers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# The errors of a full device or an exhausted quota.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(OSError):
    """A write failed because the device (or the user's quota) is full; names the file and the fix (the CLI
    prints it like a PipelineError, without a traceback)."""


def no_space(err: OSError, path: Path) -> NoSpaceError | None:
    """A NoSpaceError for a write of `path` that failed with ENOSPC or EDQUOT (None for any other error)."""
    if err.errno not in _FULL:
        return None
    path = Path(path)
    try:
        free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
        left = f"{free / 2**20:.1f} MiB free there now"
    except OSError:
        left = "its free space unknown"
    what = "quota exceeded" if err.errno == errno.EDQUOT else "no space left on the device"
    return NoSpaceError(err.errno, f"{what} while writing {path} ({left}): free space on that volume or point "
                                   f"output_dir at a larger one, then run the same command again (what was complete "
                                   f"before is untouched, and the work done so far is kept)")


def write_atomic(path: Path, *parts: bytes | memoryview | str) -> None:
    """Write parts to a temporary name, fsync, then rename: a reader sees the whole file or none of it. The
    temporary name carries the process id, so two processes writing the same file never share one. A full
    device raises NoSpaceError naming the file, and leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part.encode() if isinstance(part, str) else part)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        full = no_space(err, path)
        if full is not None:
            raise full from err
        raise
    os.replace(tmp, path)

LOCK = ".lock"




def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_files(directory: Path) -> None:
    """Flush every file of directory, and the directory itself (its new entries), to stable storage."""
    for path in [*(p for p in directory.iterdir() if p.is_file()), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on directory/.lock (creating the directory), so that two processes never write
    the same partial directory; a second one waits for the first."""
    directory = Path(directory)
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # removed by the holder between the two calls
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is writing %s: waiting for it to finish", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder may have published (renamed) or removed the directory meanwhile: lock the current file.
        try:
            current = os.stat(directory / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)
