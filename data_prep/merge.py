"""The manifest of a data set from its partitions' records, merged on the driver in partition order, one record
in memory at a time: the shards of each split, statistics per split and per source, what reading met (decode
reports, binary files, links skipped), the document starts shifted into one file per split, and the training
split's token counts summed (the unigram baseline). A corpus that holds no document, or no complete training
window, is refused here with the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from data_prep.dataset_dirs import config_record
from data_prep.decode_report import REPORTED_FILES, DecodeReport, most
from data_prep.errors import DataPrepError, SourceError
from data_prep.listing import source_configs
from data_prep.partition_work import PARTS_DIR, PartitionRecord, record_path, save_npy
from data_prep.partitions import Partition
from data_prep.shards import (
    FORMAT_VERSION,
    SPLITS,
    Manifest,
    ShardInfo,
    dtype_for_vocab,
    sha256_file,
)
from data_prep.text_tokenizer import TextTokenizer
from pipeline.config import DataConfig

log = logging.getLogger("data_prep.prepare")  # the stage's one log, whichever module writes the line

TOKEN_COUNTS = "train_token_counts.npy"


def merge_manifest(data: DataConfig, tokenizer: TextTokenizer, directory: Path, partitions: list[Partition], corpus_fingerprint: str,
           outside_links: dict[str, str]) -> Manifest:
    """The manifest from the partition records, in partition order, one record in memory at a time; what reading
    met (the records' DecodeReports, and the links that planning skipped) logged and recorded in its stats."""
    sources = source_configs(data)
    shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    totals = {key: dict.fromkeys(SPLITS, 0) for key in ("documents", "tokens", "dropped_tail_tokens")}
    per_source = [{"documents_read": 0, "documents": 0, "tokens": dict.fromkeys(SPLITS, 0), "files": set()}
                  for _ in sources]
    report, empty, counts = DecodeReport(outside_links=dict(outside_links)), [], None
    starts_parts: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for part in partitions:
        record = PartitionRecord.from_json(record_path(directory, part.index).read_text(), part.index)
        stats = per_source[part.source]
        stats["documents_read"] += record.documents_read
        stats["files"].update(piece.path for piece in part.pieces)
        for split in SPLITS:
            shards[split].extend(record.shards[split])
            for key in totals:
                totals[key][split] += getattr(record, key)[split]
            stats["documents"] += record.documents[split]
            stats["tokens"][split] += record.tokens[split]
            if record.doc_starts:
                kept = record.tokens[split] - record.dropped_tail_tokens[split]
                starts_parts[split].append((record.doc_starts[split], kept))
        decode = record.decode
        report.add(DecodeReport(**decode))
        if record.documents_read == 0:
            empty.append(part.describe())
        part_counts = np.load(directory / PARTS_DIR / record.token_counts)
        counts = part_counts if counts is None else counts + part_counts
    report.files = len({piece.path for part in partitions for piece in part.pieces})
    report.log_summary()
    if sum(s["documents_read"] for s in per_source) == 0:
        raise SourceError(f"the corpus holds no non-empty document ({report.files} inputs read"
                          + (f", {len(report.binary_files)} skipped as binary" if report.binary_files else "")
                          + "): point data.path at files with text in them")
    _check_splits(data, shards, totals)
    doc_starts = _merge_doc_starts(directory, starts_parts) if data.keep_doc_boundaries else {}
    save_npy(directory / TOKEN_COUNTS, counts if counts is not None else np.zeros(tokenizer.vocab_size, np.int64))
    window = data.context_length + 1
    stats = {**totals, "windows": {s: sum(x.n_windows for x in shards[s]) for s in SPLITS}, **_input_stats(report),
             "partitions": len(partitions), "empty_partitions": empty}
    total_tokens = max(1, sum(totals["tokens"].values()))
    source_entries = []
    for src, s in zip(sources, per_source, strict=True):
        source_entries.append({
            "name": src.name, "kind": src.source, "path": src.path,
            "files": len(s["files"]),
            "documents_read": s["documents_read"], "documents": s["documents"], "tokens": s["tokens"],
            "token_share": round(sum(s["tokens"].values()) / total_tokens, 6),
        })
    specials = tokenizer.specials
    return Manifest(
        format_version=FORMAT_VERSION, vocab_size=tokenizer.vocab_size, dtype=dtype_for_vocab(tokenizer.vocab_size).str,
        window_length=window, tokenizer_file=tokenizer.file_name,
        tokenizer_sha256=sha256_file(directory / tokenizer.file_name), bos_id=specials.bos_id, eos_id=specials.eos_id,
        pad_id=specials.pad_id, unk_id=specials.unk_id, document_prefix=list(specials.prefix),
        splits=shards, stats=stats, config=config_record(data), doc_starts=doc_starts,
        token_counts={"file": TOKEN_COUNTS, "split": "train", "sha256": sha256_file(directory / TOKEN_COUNTS)},
        source={"kind": data.source, "path": data.path, "files": report.files,
                "corpus_fingerprint": corpus_fingerprint, "sources": source_entries},
    )


def _input_stats(report: DecodeReport) -> dict:
    """The manifest's record of what reading met: totals, and the files with the most of each (REPORTED_FILES)."""
    return {
        "undecodable_bytes": report.bad_bytes, "undecodable_documents": report.bad_bytes_documents,
        "undecodable_bytes_by_file": most(report.bad_bytes_by_file, REPORTED_FILES),
        "skipped_documents": report.skipped_documents, "binary_files_skipped": report.binary_files,
        "nul_documents_skipped": report.nul_documents,
        "nul_documents_by_file": most(report.nul_documents_by_file, REPORTED_FILES),
        "outside_links_skipped": sorted(report.outside_links),
    }


def _merge_doc_starts(directory: Path, parts: dict[str, list[tuple[str, int]]]) -> dict:
    """<split>_doc_starts.npy: every partition's document starts, shifted by the kept tokens before it,
    written through a memory map (never all in memory)."""
    out = {}
    for split, files in parts.items():
        arrays = [(np.load(directory / PARTS_DIR / name, mmap_mode="r"), kept) for name, kept in files]
        path = directory / f"{split}_doc_starts.npy"
        tmp = path.with_name(path.name + ".tmp")
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(sum(len(a) for a, _ in arrays),))
        at = offset = 0
        for starts, kept in arrays:
            merged[at: at + len(starts)] = starts + offset
            at += len(starts)
            offset += kept
        merged.flush()
        del merged
        os.replace(tmp, path)
        out[split] = {"file": path.name, "n_documents": at, "sha256": sha256_file(path)}
    return out


def _check_splits(data: DataConfig, shards: dict[str, list[ShardInfo]], totals: dict) -> None:
    window = data.context_length + 1
    if not shards["train"]:
        raise DataPrepError(
            f"the training split holds {totals['tokens']['train']} tokens, not one complete window of {window} "
            f"tokens in any partition: add text to the corpus, lower model.context_length (data.context_length="
            f"{data.context_length}), or raise data.partition_bytes"
        )
    if data.val_fraction > 0 and not shards["validation"]:
        log.warning(
            "the validation split holds %d tokens of %d documents, not one window of %d tokens in any partition: "
            "validation loss cannot be measured; raise data.val_fraction or data.partition_bytes",
            totals["tokens"]["validation"], totals["documents"]["validation"], window,
        )
