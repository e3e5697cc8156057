"""One rule for every name that comes from outside the process: it stays under its root, and names a regular file.

Names read from checkpoints (COMPLETE markers, `latest`), data sets (manifests, blends), object-store listings
and the user's own names (run_name, data set names) all become local paths. A name that is absolute, holds a
`..` part, a backslash or a NUL, or passes through a symbolic link below its root could make the pipeline read,
write or delete outside the directory it works in; such a name is refused with a ContainmentError naming it,
where it came from and the fix. A file that is a link, a device, a FIFO or a directory where a file is expected
is refused the same way (reading a device named in a manifest would hang; a link would leave the root).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from pipeline.errors import PipelineError

# A plain name: one path component of letters, digits and . _ + = , @ -, not starting with a dot.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*")


class ContainmentError(PipelineError, ValueError):
    """A name read from outside (or given by the user) would lie outside its root, or is not a regular file."""


def _refuse(what: str, name: str, why: str, fix: str) -> ContainmentError:
    return ContainmentError(f"{what} {name!r} {why}: refusing it; {fix}")


def contained(root: Path | str, name: str, what: str, fix: str) -> Path:
    """root / name, when name is a relative path that stays below root: not empty, not absolute, without a `..`
    part, a backslash or a NUL, and with no part below root a symbolic link (so that it cannot resolve
    elsewhere, now or after a link appears). `what` says where the name came from ("the manifest of X names
    the shard"), `fix` what to do about it. Raises ContainmentError."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise _refuse(what, str(name), "is not a relative path name", fix)
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise _refuse(what, name, f"would lie outside {root} (absolute, or with '..')", fix)
    root = Path(root)
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise _refuse(what, name, f"passes through the symbolic link {current} (links are never followed below "
                                      f"{root})", fix)
    return root / name


def regular_file(path: Path | str, what: str, fix: str) -> Path:
    """path, when it is a regular file itself (not a link to one, a device, a FIFO, a socket or a directory);
    ContainmentError naming it otherwise, FileNotFoundError when it does not exist."""
    path = Path(path)
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device, FIFO or socket")
        raise _refuse(what, str(path), f"is {kind}, not a regular file", fix)
    return path


def is_regular_file(path: Path | str) -> bool:
    """Whether path is a regular file itself (lstat: a link to a file is not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def contained_file(root: Path | str, name: str, what: str, fix: str) -> Path:
    """contained(), then regular_file(): a name from outside that must be an existing regular file below root."""
    return regular_file(contained(root, name, what, fix), what, fix)


def tree_files(root: Path | str, what: str, fix: str) -> list[str]:
    """Every file below root as a relative POSIX name, sorted, walking without following links; a symbolic link
    or a special file anywhere in the tree is refused (ContainmentError naming it)."""
    root = Path(root)
    names = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        for entry in [*dirs, *files]:
            path = Path(directory) / entry
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "a device, FIFO or socket"
                raise ContainmentError(f"{what} {str(path.relative_to(root))!r}, which is {kind}: refusing it; {fix}")
            names.append(path.relative_to(root).as_posix())
    return sorted(names)


def plain_name(name: str, field: str) -> str:
    """A name the user gives that becomes one directory name (run_name, data.name, a mixture source's name): one
    component of letters, digits and . _ + = , @ -, not starting with a dot."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ContainmentError(
            f"{field}={name!r} is not a plain name: it becomes a directory name below output_dir, so it may hold "
            f"only letters, digits and . _ + = , @ - (no '/', no '..', not starting with '.'); e.g. "
            f"{field}={re.sub(r'[^A-Za-z0-9._+=,@-]+', '-', str(name)).strip('.-') or 'run'}"
        )
    return name
