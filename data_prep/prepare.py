"""The prepare stage: corpus -> tokenizer -> parallel tokenization (Ray Data) -> packed, checksummed shards.

Outputs land in a directory named by a fingerprint of the data config. It is built under a temporary name
and renamed when complete, so a changed config never writes over an old data set and an interrupted run
never leaves a directory that looks complete. A re-run with the same config finds it and skips the work.

Tokenization runs in a pool of Ray Data actors over blocks of whole documents. Each actor turns its block
into one flat token stream per split (documents followed by EOS), so the driver receives two bytes per
token and only cuts windows and writes shards. Blocks come back in document order, which makes the output
byte-identical whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from data_prep.packing import WindowPacker, join_with_eos
from data_prep.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    incomplete_reason,
    load_manifest,
    sha256_file,
    write_atomic,
)
from data_prep.sources import DecodeReport, read_documents
from data_prep.tokenizer import check_round_trip, copy_tokenizer, load_tokenizer, train_tokenizer
from pipeline.config import DataConfig, fingerprint, validate_data

log = logging.getLogger(__name__)

# Fields that do not change the bytes written.
_NOT_IN_FINGERPRINT = ("num_workers", "output_dir")
# Bump when the same config would produce different bytes (reading, tokenizer training, packing), so that
# a new recipe gets a new directory instead of silently reusing data sets made by the old one.
RECIPE_VERSION = 2
# Documents per tokenizer round-trip check.
_ROUND_TRIP_SAMPLE = 64
# Characters of text per block sent to a tokenizer actor: large enough to amortise the per-call cost,
# small enough that every actor gets several blocks.
_MIN_BLOCK_CHARS, _MAX_BLOCK_CHARS = 1 << 16, 1 << 24
_PROGRESS_INTERVAL_S = 5.0


class DataPrepError(ValueError):
    """The data set cannot be prepared as configured."""


def data_fingerprint(data: DataConfig) -> str:
    return fingerprint({**_config_record(data), "format_version": FORMAT_VERSION, "recipe_version": RECIPE_VERSION})


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
    return incomplete_reason(out) is None


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) from the document's text alone (not its position or the run)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(text: str, val_fraction: float) -> str:
    """validation when the document's hash fraction falls below val_fraction, else train."""
    return "validation" if hash_fraction(text) < val_fraction else "train"


def assign_splits(docs: list[str], val_fraction: float) -> np.ndarray:
    """is_validation per document, by hash. A tiny corpus whose hashes all miss one side still gets a
    validation document (the lowest hash) and a training document (the highest)."""
    fractions = np.array([hash_fraction(d) for d in docs])
    is_val = fractions < val_fraction
    if val_fraction > 0 and len(docs) > 1:
        if not is_val.any():
            is_val[np.argmin(fractions)] = True
        if is_val.all():
            is_val[np.argmax(fractions)] = False
    return is_val


class TokenizeBlock:
    """Ray Data actor: encodes a block of documents into one flat token stream per split (EOS after each
    document), returned as bytes so that little travels back to the driver."""

    def __init__(self, model_proto: bytes, dtype: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.load_from_serialized_proto(model_proto)
        self.eos_id = self.sp.eos_id()
        self.dtype = np.dtype(dtype)

    def __call__(self, batch):
        import pyarrow as pa

        out: dict[str, list] = {"block": []}
        for split in SPLITS:
            out[split], out[f"{split}_lengths"] = [], []
        for i in range(batch.num_rows):
            texts = batch.column("texts")[i].as_py()
            is_val = batch.column("is_val")[i].as_py()
            # One thread per actor: the actor holds one CPU of the pool.
            encoded = self.sp.encode(texts, num_threads=1)
            out["block"].append(batch.column("block")[i].as_py())
            for split in SPLITS:
                want_val = split == "validation"
                docs = [ids for ids, v in zip(encoded, is_val, strict=True) if v == want_val]
                stream, lengths = join_with_eos(docs, self.eos_id, self.dtype)
                out[split].append(stream.tobytes())
                out[f"{split}_lengths"].append(lengths.astype(np.int64).tobytes())
        return pa.table({key: pa.array(values, pa.int64() if key == "block" else pa.large_binary())
                         for key, values in out.items()})


def make_blocks(docs: list[str], is_val: np.ndarray, workers: int) -> list[dict]:
    """Consecutive runs of whole documents of about the same number of characters, in document order."""
    total = sum(len(d) for d in docs)
    target = int(min(_MAX_BLOCK_CHARS, max(_MIN_BLOCK_CHARS, total // (4 * workers))))
    blocks, start, size = [], 0, 0
    for i, doc in enumerate(docs):
        size += len(doc)
        if size >= target or i == len(docs) - 1:
            blocks.append({"block": len(blocks), "texts": docs[start : i + 1], "is_val": is_val[start : i + 1].tolist()})
            start, size = i + 1, 0
    return blocks


def pool_size(num_workers: int | None) -> int:
    """Tokenizer actors: data.num_workers, or every CPU of the Ray cluster, never more than it has."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if num_workers is None:
        return cpus
    if num_workers > cpus:
        log.warning("data.num_workers=%d but the Ray cluster has %d CPUs: using %d tokenizer actors",
                    num_workers, cpus, cpus)
    return min(num_workers, cpus)


def tokenize_blocks(blocks: list[dict], model_proto: bytes, dtype: np.dtype, workers: int):
    """Yield each block's tokenized output (a dict of bytes per split), in block order."""
    import ray

    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds = ds.map_batches(
        TokenizeBlock,
        fn_constructor_kwargs={"model_proto": model_proto, "dtype": dtype.str},
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(blocks))),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=1,
    )
    expected = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        for row in batch.to_pylist():
            if row["block"] != expected:  # order is what makes the output independent of the worker count
                raise RuntimeError(f"Ray Data returned block {row['block']} where block {expected} was due")
            expected += 1
            yield row
    if expected != len(blocks):
        raise RuntimeError(f"Ray Data returned {expected} of {len(blocks)} blocks")


@dataclasses.dataclass
class SplitWriter:
    """Packs one split's token stream into windows and shards; remembers where documents start."""

    packer: WindowPacker
    shards: ShardWriter
    documents: int = 0
    tokens: int = 0
    doc_starts: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, stream: np.ndarray, lengths: np.ndarray, keep_doc_starts: bool) -> None:
        if keep_doc_starts and len(lengths):
            self.doc_starts.append(self.tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        self.documents += len(lengths)
        self.tokens += len(stream)
        self.shards.add(self.packer.push(stream))


def prepare(data: DataConfig) -> Path:
    """Prepare the data set of this config (or find it prepared) and return its directory."""
    validate_data(data)
    out = dataset_dir(data)
    reason = incomplete_reason(out)
    if reason is None:
        _check_same_tokenizer(data, out)
        log.info("data set %s is already prepared (manifest and shards complete): skipping", out)
        return out
    if out.exists():
        log.info("%s exists but is incomplete (%s): preparing it again", out, reason)
    started = time.time()
    docs, report = read_documents(data)
    is_val = assign_splits(docs, data.val_fraction)
    n_val = int(is_val.sum())
    log.info("read %d documents (%d train, %d validation) from %d files of %s in %.1fs",
             len(docs), len(docs) - n_val, n_val, report.files, data.source, time.time() - started)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        sp = _make_tokenizer(data, docs, is_val, tmp / TOKENIZER_FILE)
        writers, seconds = _tokenize_and_write(data, docs, is_val, sp, tmp)
        manifest = _manifest(data, sp, tmp, writers, report)
        write_atomic(tmp / MANIFEST, manifest.to_json())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_summary(out, manifest, time.time() - started, seconds)
    return out


def _make_tokenizer(data: DataConfig, docs: list[str], is_val: np.ndarray, path: Path):
    tok = data.tokenizer
    if tok.model_path:
        copy_tokenizer(tok.model_path, path)
        source = tok.model_path
    else:
        t0 = time.time()
        train_tokenizer((d for d, v in zip(docs, is_val, strict=True) if not v), tok, path, data.seed)
        log.info("trained a %s tokenizer of %d pieces in %.1fs", tok.type, tok.vocab_size, time.time() - t0)
        source = "trained on the training split"
    sp = load_tokenizer(path)
    step = max(1, len(docs) // _ROUND_TRIP_SAMPLE)
    check_round_trip(sp, docs[::step][:_ROUND_TRIP_SAMPLE], source)
    return sp


def _tokenize_and_write(data: DataConfig, docs: list[str], is_val: np.ndarray, sp, tmp: Path):
    vocab_size = sp.get_piece_size()
    dtype = dtype_for_vocab(vocab_size)
    window = data.context_length + 1
    shard_windows = max(1, data.shard_tokens // window)
    writers = {
        s: SplitWriter(WindowPacker(window, sp.eos_id(), dtype), ShardWriter(tmp, s, window, dtype, shard_windows))
        for s in SPLITS
    }
    workers = pool_size(data.num_workers)
    blocks = make_blocks(docs, is_val, workers)
    log.info("tokenizing %d documents in %d blocks with %d Ray Data actors", len(docs), len(blocks), workers)
    t0 = last_report = time.time()
    done_docs = 0
    for row in tokenize_blocks(blocks, sp.serialized_model_proto(), dtype, workers):
        for split in SPLITS:
            stream = np.frombuffer(row[split], dtype=dtype)
            lengths = np.frombuffer(row[f"{split}_lengths"], dtype=np.int64)
            writers[split].add(stream, lengths, data.keep_doc_boundaries)
            done_docs += len(lengths)
        if time.time() - last_report > _PROGRESS_INTERVAL_S:
            tokens = sum(w.tokens for w in writers.values())
            log.info("tokenized %d of %d documents, %d tokens (%.0f tokens/s)",
                     done_docs, len(docs), tokens, tokens / (time.time() - t0))
            last_report = time.time()
    seconds = time.time() - t0
    for split, writer in writers.items():
        writer.shards.close()
        if data.keep_doc_boundaries:
            _write_doc_starts(tmp, split, writer)
    train = writers["train"]
    if not train.shards.shards:
        raise DataPrepError(
            f"the training split holds {train.tokens} tokens, not one complete window of {window} tokens: "
            f"add text to the corpus or lower model.context_length (data.context_length={data.context_length})"
        )
    val = writers["validation"]
    if data.val_fraction > 0 and not val.shards.shards:
        log.warning(
            "the validation split holds %d tokens of %d documents, not one window of %d tokens: validation loss "
            "cannot be measured; raise data.val_fraction", val.tokens, val.documents, window,
        )
    return writers, seconds


def _write_doc_starts(tmp: Path, split: str, writer: SplitWriter) -> None:
    kept = writer.packer.window_length * sum(s.n_windows for s in writer.shards.shards)
    starts = np.concatenate(writer.doc_starts) if writer.doc_starts else np.empty(0, dtype=np.int64)
    buffer = io.BytesIO()
    np.save(buffer, starts[starts < kept].astype(np.int64))
    write_atomic(tmp / f"{split}_doc_starts.npy", buffer.getvalue())


def _manifest(data: DataConfig, sp, tmp: Path, writers: dict[str, SplitWriter], report: DecodeReport) -> Manifest:
    window = data.context_length + 1
    shards = {s: w.shards.shards for s, w in writers.items()}
    stats = {
        "documents": {s: w.documents for s, w in writers.items()},
        "tokens": {s: w.tokens for s, w in writers.items()},
        "windows": {s: sum(x.n_windows for x in shards[s]) for s in SPLITS},
        "dropped_tail_tokens": {s: w.packer.dropped_tokens for s, w in writers.items()},
        "undecodable_bytes": report.bad_bytes,
        "undecodable_documents": report.bad_bytes_documents,
        "skipped_documents": report.skipped_documents,
    }
    doc_starts = {}
    if data.keep_doc_boundaries:
        for split in SPLITS:
            path = tmp / f"{split}_doc_starts.npy"
            doc_starts[split] = {"file": path.name, "n_documents": int(np.load(path).shape[0]),
                                 "sha256": sha256_file(path)}
    return Manifest(
        format_version=FORMAT_VERSION, vocab_size=sp.get_piece_size(), dtype=dtype_for_vocab(sp.get_piece_size()).str,
        window_length=window, tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(tmp / TOKENIZER_FILE),
        bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(),
        splits=shards, stats=stats, config=_config_record(data), doc_starts=doc_starts,
        source={"kind": data.source, "path": data.path, "files": report.files},
    )


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to its final name, unless another run got there first."""
    if out.exists():
        if incomplete_reason(out) is None:  # a concurrent run with the same config finished first
            log.info("%s was completed by another run meanwhile: keeping it", out)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(out)  # an incomplete leftover of an interrupted attempt with this config
    try:
        os.replace(tmp, out)
    except OSError:
        if incomplete_reason(out) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary directories left by killed runs of this config on this host."""
    prefix = f"{out.name}.tmp-{socket.gethostname()}-"
    for path in out.parent.glob(f"{out.name}.tmp-*"):
        if not path.name.startswith(prefix):
            continue
        try:
            os.kill(int(path.name[len(prefix):]), 0)
        except ProcessLookupError:
            log.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _check_same_tokenizer(data: DataConfig, out: Path) -> None:
    """The fingerprint names model_path, not its content: refuse a data set made with another tokenizer."""
    path = data.tokenizer.model_path
    if not path:
        return
    manifest = load_manifest(out)
    if sha256_file(Path(path).expanduser()) != manifest.tokenizer_sha256:
        raise DataPrepError(
            f"data.tokenizer.model_path={path} has changed since {out} was prepared with it: delete {out} "
            f"to prepare it again with the new tokenizer, or set another data.name to keep both"
        )


def _log_summary(out: Path, manifest: Manifest, seconds: float, tokenize_seconds: float) -> None:
    stats = manifest.stats
    total = sum(stats["tokens"].values())
    log.info(
        "prepared %s in %.1fs: documents %d train / %d validation, tokens %d / %d, windows %d / %d "
        "(of %d tokens), dropped tail tokens %d / %d; tokenized %.0f tokens/s",
        out, seconds, stats["documents"]["train"], stats["documents"]["validation"],
        stats["tokens"]["train"], stats["tokens"]["validation"], stats["windows"]["train"],
        stats["windows"]["validation"], manifest.window_length, stats["dropped_tail_tokens"]["train"],
        stats["dropped_tail_tokens"]["validation"], total / max(tokenize_seconds, 1e-9),
    )
