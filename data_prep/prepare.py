"""The prepare stage: corpus -> tokenizer -> parallel tokenization (Ray Data) -> packed, checksummed shards.

Outputs land in a directory named by a fingerprint of the data config, built under a temporary name and
renamed when complete, so a changed config never writes over an old data set and an interrupted run
never leaves a directory that looks complete. A re-run with the same config skips the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_prep.packing import WindowPacker
from data_prep.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    load_manifest,
    sha256_file,
    write_atomic,
)
from data_prep.sources import read_documents
from data_prep.tokenizer import copy_tokenizer, load_tokenizer, train_tokenizer
from pipeline.config import DataConfig, fingerprint

log = logging.getLogger(__name__)

# Fields that do not change the bytes written.
_NOT_IN_FINGERPRINT = ("num_workers", "output_dir")


def data_fingerprint(data: DataConfig) -> str:
    return fingerprint({**_config_record(data), "format_version": FORMAT_VERSION})


def _config_record(data: DataConfig) -> dict:
    """The data config as recorded in the manifest: only what shapes the bytes, so that the manifest is
    identical whatever the worker count or output location."""
    fields = dataclasses.asdict(data)
    for key in _NOT_IN_FINGERPRINT:
        fields.pop(key)
    return fields


def dataset_dir(data: DataConfig) -> Path:
    return Path(data.output_dir) / f"{data.name}-{data_fingerprint(data)}"


def is_complete(out: Path) -> bool:
    try:
        manifest = load_manifest(out)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    files = [s for shards in manifest.splits.values() for s in shards]
    return manifest.tokenizer_path.is_file() and all((out / s.file).is_file() for s in files)


def split_of(text: str, val_fraction: float) -> str:
    """validation when the document's hash falls below val_fraction: stable, independent of order."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "validation" if h / 2**64 < val_fraction else "train"


class TokenizeBatch:
    """Ray Data actor: one SentencePiece processor per actor, loaded from the serialized model."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.load_from_serialized_proto(model_proto)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = self.sp.encode(batch["text"].tolist())
        ids = np.empty(len(encoded), dtype=object)
        ids[:] = [np.asarray(e, dtype=np.int32) for e in encoded]
        return {"index": batch["index"], "ids": ids}


def _tokenize_parallel(docs: list[str], model_proto: bytes, num_workers: int | None, batch_docs: int):
    """Yield (doc index, token ids) in document order, tokenized by a pool of Ray Data actors."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    items = [{"index": i, "text": t} for i, t in enumerate(docs)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), workers * 4)))
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"model_proto": model_proto},
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=batch_docs,
        batch_format="numpy",
        num_cpus=1,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        yield from zip(batch["index"].tolist(), batch["ids"], strict=True)


def prepare(data: DataConfig) -> Path:
    out = dataset_dir(data)
    if is_complete(out):
        log.info("data set %s is already prepared (manifest and shards complete): skipping", out)
        return out
    started = time.time()
    docs, decode_report = read_documents(data)
    splits = [split_of(d, data.val_fraction) for d in docs]
    if data.val_fraction > 0 and "validation" not in splits:
        # Tiny corpora: make sure validation is not empty by moving the lowest-hash document there.
        splits[0] = "validation"
    n_val = splits.count("validation")
    log.info("read %d documents (%d train, %d validation) from %s", len(docs), len(docs) - n_val, n_val, data.source)

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok_path = tmp / TOKENIZER_FILE
        if data.tokenizer.model_path:
            copy_tokenizer(data.tokenizer.model_path, tok_path)
        else:
            t0 = time.time()
            train_docs = (d for d, s in zip(docs, splits, strict=True) if s == "train")
            train_tokenizer(train_docs, data.tokenizer, tok_path, data.seed)
            log.info("trained a %s tokenizer of %d pieces in %.1fs", data.tokenizer.type, data.tokenizer.vocab_size, time.time() - t0)
        sp = load_tokenizer(tok_path)
        vocab_size = sp.get_piece_size()
        dtype = dtype_for_vocab(vocab_size)
        window = data.context_length + 1
        shard_windows = max(1, data.shard_tokens // window)
        writers = {s: ShardWriter(tmp, s, window, dtype, shard_windows) for s in SPLITS}
        packers = {s: WindowPacker(window, sp.eos_id()) for s in SPLITS}
        tokens = dict.fromkeys(SPLITS, 0)
        t0, last_report = time.time(), time.time()
        model_proto = sp.serialized_model_proto()
        for index, ids in _tokenize_parallel(docs, model_proto, data.num_workers, batch_docs=64):
            split = splits[index]
            tokens[split] += len(ids) + 1
            writers[split].add(packers[split].pack([ids]))
            if time.time() - last_report > 5:
                log.info("tokenized %d tokens (%.0f tokens/s)", sum(tokens.values()), sum(tokens.values()) / (time.time() - t0))
                last_report = time.time()
        elapsed = time.time() - t0
        shards = {s: writers[s].close() for s in SPLITS}
        if not shards["train"]:
            raise ValueError(
                f"the training split holds no complete window of {window} tokens ({tokens['train']} tokens in all): "
                f"add data or lower model.context_length"
            )
        stats = {
            "documents": {s: splits.count(s) for s in SPLITS},
            "tokens": tokens,
            "windows": {s: sum(x.n_windows for x in shards[s]) for s in SPLITS},
            "dropped_tail_tokens": {s: packers[s].dropped_tokens for s in SPLITS},
            "undecodable_documents": decode_report.bad_bytes_documents,
            "skipped_documents": decode_report.skipped_documents,
        }
        manifest = Manifest(
            format_version=FORMAT_VERSION, vocab_size=vocab_size, dtype=dtype.str, window_length=window,
            tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(tok_path),
            bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(),
            splits=shards, stats=stats, config=_config_record(data),
        )
        write_atomic(tmp / MANIFEST, manifest.to_json())
        if out.exists():  # an incomplete leftover of an older attempt with the same config
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(tokens.values())
    log.info(
        "prepared %s in %.1fs: %d tokens (%.0f tokens/s tokenizing), windows: %d train, %d validation",
        out, time.time() - started, total, total / max(elapsed, 1e-9), stats["windows"]["train"], stats["windows"]["validation"],
    )
    return out
