"""The corpus as one list of documents: a single source as read, or a weighted mixture of several.

A mixture samples each source by its weight, a per-document rate relative to the source's own size: every
document appears floor(weight) times, and a seeded choice of exactly round(frac(weight) x n) of its n
documents once more (weight 2.0 doubles a source, 0.5 keeps half of it, 1.0 takes it as it is). The copies
of all sources are then interleaved in one seeded order, so every shard holds the mix. Both draws depend
only on data.seed and the source's name, never on the worker count, so the bytes written do not either.
A copy of a document goes to the same split as the document (the split follows the text's hash).

The corpus fingerprint names every input file by (path, size, mtime_ns), or by its sha256 when the whole
corpus is small, so that a changed input gives a new data set directory instead of a stale one.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.shards import sha256_file
from data_prep.sources import DecodeReport, SourceError, input_files, read_source, source_configs
from pipeline.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)

# Below this many bytes of input in all, the fingerprint hashes file contents (robust to a touched mtime).
_HASH_CONTENT_BYTES = 32 << 20


@dataclass
class SourceStats:
    """What one source gave: documents read, documents after sampling by weight (copies counted), and the
    tokens they became per split (filled in by the prepare stage)."""

    name: str
    kind: str
    path: str | None
    weight: float
    files: int = 0
    documents_read: int = 0
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Corpus:
    documents: list[str]
    # Index into `sources` of each document.
    source_of: np.ndarray
    sources: list[SourceStats]
    # Undecodable input over all sources.
    report: DecodeReport


def source_field(data: DataConfig, index: int) -> str:
    """How errors name a source's config entry."""
    return f"data.mixture.{index}" if data.source == "mixture" else "data"


def copies_per_document(n_documents: int, weight: float, seed: int, name: str) -> np.ndarray:
    """How many times each of a source's documents enters the mix (see the module docstring)."""
    whole = int(np.floor(weight))
    copies = np.full(n_documents, whole, dtype=np.int64)
    extra = int(np.floor((weight - whole) * n_documents + 0.5))
    if extra:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        copies[rng.permutation(n_documents)[:extra]] += 1
    return copies


def read_corpus(data: DataConfig) -> Corpus:
    """The documents of data's source, or of its mixture sampled by weight and interleaved."""
    sources = source_configs(data)
    if data.source != "mixture":
        docs, report = read_source(sources[0], data.on_decode_error)
        src = sources[0]
        stats = SourceStats(src.name, src.source, src.path, 1.0, report.files, len(docs), len(docs))
        return Corpus(docs, np.zeros(len(docs), dtype=np.int32), [stats], report)
    per_source, source_ids, doc_ids, stats = [], [], [], []
    report = DecodeReport()
    for i, src in enumerate(sources):
        docs, part = read_source(src, data.on_decode_error, source_field(data, i))
        copies = copies_per_document(len(docs), src.weight, data.seed, src.name)
        if not copies.sum():
            log.warning("data.mixture.%d (%s): weight %g keeps none of its %d documents; raise its weight",
                        i, src.name, src.weight, len(docs))
        per_source.append(docs)
        doc_ids.append(np.repeat(np.arange(len(docs), dtype=np.int64), copies))
        source_ids.append(np.full(len(doc_ids[-1]), i, dtype=np.int32))
        stats.append(SourceStats(src.name, src.source, src.path, src.weight, part.files, len(docs), len(doc_ids[-1])))
        for key in ("files", "bad_bytes", "bad_bytes_documents", "skipped_documents"):
            setattr(report, key, getattr(report, key) + getattr(part, key))
    source_of, doc_of = np.concatenate(source_ids), np.concatenate(doc_ids)
    if not len(source_of):
        raise SourceError("the mixture's weights keep no document: raise the weights in data.mixture")
    order = np.random.default_rng([data.seed, zlib.crc32(b"interleave")]).permutation(len(source_of))
    source_of, doc_of = source_of[order], doc_of[order]
    documents = [per_source[s][d] for s, d in zip(source_of.tolist(), doc_of.tolist(), strict=True)]
    log.info("mixture of %d sources: %s", len(sources), ", ".join(
        f"{s.name} x{s.weight:g}: {s.documents} of {s.documents_read} documents" for s in stats))
    return Corpus(documents, source_of, stats, report)


def corpus_record(data: DataConfig) -> list[dict]:
    """Per source, its input files as [name, size, sha256 or mtime_ns] (see the module docstring); a hub
    data set is named only by its hub name. Cheap: one stat per file, hashing only small corpora."""
    listed = [(src, *_listed_files(src, source_field(data, i))) for i, src in enumerate(source_configs(data))]
    small = sum(size for _, _, files in listed for _, size, _, _ in files) <= _HASH_CONTENT_BYTES
    record = []
    for src, problem, files in listed:
        entry = {"name": src.name, "source": src.source, "path": src.path}
        if problem:
            entry["unreadable"] = problem
        entry["files"] = [[name, size, sha256_file(path) if small else mtime_ns] for name, size, path, mtime_ns in files]
        record.append(entry)
    return record


def _listed_files(src: SourceConfig, where: str) -> tuple[str | None, list[tuple[str, int, Path, int]]]:
    """(problem, [(name, size, path, mtime_ns)]): a source that cannot be listed is recorded, not raised, so
    that a stage that only looks the data set up does not need the corpus (prepare reports the problem)."""
    try:
        root, files = input_files(src, where)
    except (SourceError, OSError) as err:
        return str(err), []
    listed = []
    for path in files:
        stat = path.stat()
        listed.append((str(path.relative_to(root)) if root else str(path), stat.st_size, path, stat.st_mtime_ns))
    return None, listed


def read_documents(data: DataConfig) -> tuple[list[str], DecodeReport]:
    """All non-empty documents of the configured corpus, in a deterministic order (a mixture: sampled by
    weight and interleaved, see data_prep.mixture)."""
    corpus = read_corpus(data)
    return corpus.documents, corpus.report
