"""Documents from a piece of a source's input (data_prep.partitions), in file order: one reader per format.

    shakespeare   one document per scene of each markdown play
    text          a document per line, per file or per paragraph (data.doc_split)
    jsonl         the text field of each JSON line; a line that cannot be parsed, however it fails, is named by
                  file and line
    parquet       the text column of a row group
    hf_disk       a row range of a data set saved with save_to_disk (memory-mapped Arrow)
    hf_hub        a shard of a streamed hub data set

Everything read from a corpus is untrusted: the bytes are checked on the way to text (data_prep.raw_input: NUL
bytes skip their document or stop the run, undecodable bytes are counted per file, no document is held past
data.max_document_bytes), and the files come from the walk that never follows links (data_prep.listing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.decode_report import DecodeReport
from data_prep.errors import SourceError
from data_prep.listing import shakespeare_files
from data_prep.raw_input import (
    decode_bytes,
    holds_nul,
    paragraphs,
    piece_lines,
    read_whole,
    skip_binary,
    text_holds_nul,
    unreadable,
)
from pipeline.config import DataConfig, SourceConfig

# A heading that opens a new document in the plays: any level, SCENE / PROLOGUE / EPILOGUE / INDUCTION.
_SCENE_HEADING = re.compile(r"^#{1,6}\s+(SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)


_HEADING = re.compile(r"^#{1,6}\s")


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
        raise unreadable(piece.path, err, where) from err


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
