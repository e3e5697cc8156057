"""Durable files on the local file system: whole-or-nothing writes, flushing to stable storage, and a lock
that serialises the processes of one machine on a directory.

Shards, manifests, journals, checkpoint markers and downloads all go through these three helpers.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = ".lock"


def write_atomic(path: Path, *parts: bytes | memoryview | str) -> None:
    """Write parts to a temporary name, fsync, then rename: a reader sees the whole file or none of it. The
    temporary name carries the process id, so two processes writing the same file never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for part in parts:
            f.write(part.encode() if isinstance(part, str) else part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
