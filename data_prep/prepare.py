"""The prepare stage: corpus -> tokenizer -> parallel tokenization (Ray Data or Ray actors) -> packed, checksummed shards.

Outputs land in a directory named by a fingerprint of the data config and of its input files (their
names, sizes and modification times, or contents for a small corpus: data_prep.mixture.corpus_record), so
a changed config or corpus never writes over an old data set, and an edited corpus is never mistaken for
the one already prepared. The directory is built as `<name>-<fingerprint>.partial/` under a lock and
renamed when complete: an interrupted run never leaves a directory that looks complete, and the next run
resumes from the shards it had written (data_prep.journal). A re-run with the same config finds the
finished directory and skips the work.

The build: read the documents (one source, or a weighted mixture), split them train/validation by hash,
train or load the tokenizer, encode the corpus in a pool of Ray actors, driven by Ray Data or directly (data_prep.encoding), and on
the driver cut each split's token stream into windows and shards, checkpointing progress after every shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.encoding import (
    RayDataTokenizerPool,
    TokenizerPool,
    can_cut_documents,
    make_blocks,
    make_segments,
    pool_size,
    tokenize_engine,
)
from data_prep.journal import JOURNAL, Checkpoint, ProgressJournal
from data_prep.mixture import Corpus, corpus_record, read_corpus
from data_prep.packing import WindowPacker
from data_prep.shards import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    incomplete_reason,
    load_manifest,
    sha256_file,
)
from data_prep.tokenizer import check_round_trip, copy_tokenizer, load_tokenizer, train_tokenizer
from pipeline.config import DataConfig, PipelineError, fingerprint, validate_data
from pipeline.files import LOCK, directory_lock, write_atomic

log = logging.getLogger(__name__)

# Fields that do not change the bytes written.
_NOT_IN_FINGERPRINT = ("num_workers", "tokenize_engine", "output_dir", "verify_checksums")
# Bump when the same config would produce different bytes (reading, tokenizer training, packing), so that
# a new recipe gets a new directory instead of silently reusing data sets made by the old one.
RECIPE_VERSION = 3
# Documents per tokenizer round-trip check, and characters of each (a 50 MB document is checked by its start).
_ROUND_TRIP_SAMPLE, _ROUND_TRIP_CHARS = 64, 1 << 14
_PROGRESS_INTERVAL_S = 5.0
PARTIAL_SUFFIX = ".partial"


class DataPrepError(PipelineError, ValueError):
    """The data set cannot be prepared as configured."""


def data_fingerprint(data: DataConfig, corpus: list[dict] | None = None) -> str:
    """Fingerprint of what shapes the bytes: the config (less worker count and location), the format and
    recipe versions, and the input files (corpus_record, computed here unless given)."""
    record = {**_config_record(data), "format_version": FORMAT_VERSION, "recipe_version": RECIPE_VERSION,
              "corpus": corpus_record(data) if corpus is None else corpus}
    return fingerprint(record)


def _config_record(data: DataConfig) -> dict:
    """The data config as recorded in the manifest: only what shapes the bytes, so that the manifest is
    identical whatever the worker count or output location."""
    fields = dataclasses.asdict(data)
    for key in _NOT_IN_FINGERPRINT:
        fields.pop(key)
    return fields


def dataset_dir(data: DataConfig, corpus: list[dict] | None = None) -> Path:
    return Path(data.output_dir) / f"{data.name}-{data_fingerprint(data, corpus)}"


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


@dataclasses.dataclass
class SplitWriter:
    """Packs one split's token stream into windows and shards, and counts what went in. After a resume,
    the first `skip_tokens` tokens of the stream are already in the shards written before."""

    packer: WindowPacker
    shards: ShardWriter
    documents: int = 0
    tokens: int = 0
    source_tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    skip_tokens: int = 0

    def add(self, stream: np.ndarray, documents: int, source_tokens: np.ndarray) -> None:
        self.documents += documents
        self.tokens += len(stream)
        self.source_tokens += source_tokens
        if self.skip_tokens:
            dropped = min(self.skip_tokens, len(stream))
            stream, self.skip_tokens = stream[dropped:], self.skip_tokens - dropped
        self.shards.add(self.packer.push(stream))


def prepare(data: DataConfig) -> Path:
    """Prepare the data set of this config (or find it prepared) and return its directory."""
    validate_data(data)
    corpus = corpus_record(data)
    out = dataset_dir(data, corpus)
    if _already_prepared(data, out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    with directory_lock(partial):
        if _already_prepared(data, out):  # another run finished it while this one waited
            shutil.rmtree(partial, ignore_errors=True)
            return out
        if out.exists():
            log.info("%s exists but is incomplete (%s): preparing it again", out, incomplete_reason(out))
        started = time.time()
        try:
            manifest, tokenize_seconds = _build(data, partial, {"dataset": out.name}, fingerprint(corpus))
        except ValueError:
            shutil.rmtree(partial, ignore_errors=True)  # the input or the config is at fault: nothing to resume
            raise
        except BaseException:
            log.warning("prepare stopped: the complete shards stay in %s; run the same command again to resume",
                        partial)
            raise
        _publish(partial, out)
    _log_summary(out, manifest, time.time() - started, tokenize_seconds)
    return out


def _already_prepared(data: DataConfig, out: Path) -> bool:
    if incomplete_reason(out) is not None:
        return False
    _check_same_tokenizer(data, out)
    log.info("data set %s is already prepared (manifest and shards complete): skipping", out)
    return True


def _build(data: DataConfig, partial: Path, key: dict, corpus_fingerprint: str) -> tuple[Manifest, float]:
    workers = pool_size(data.num_workers)
    pool = None
    if data.tokenizer.model_path and data.tokenize_engine != "ray_data":
        # The model is known: plain actors start while the corpus is read (closed again if `auto` then
        # picks Ray Data for a corpus this large).
        model = load_tokenizer(data.tokenizer.model_path)
        pool = TokenizerPool(model.serialized_model_proto(), dtype_for_vocab(model.get_piece_size()), workers)
    try:
        t0 = time.time()
        corpus = read_corpus(data)
        docs = corpus.documents
        is_val = assign_splits(docs, data.val_fraction)
        n_val = int(is_val.sum())
        log.info("read %d documents (%d train, %d validation) from %d files in %.1fs",
                 len(docs), len(docs) - n_val, n_val, corpus.report.files, time.time() - t0)
        journal = ProgressJournal.open(partial, {**key, "documents": _documents_digest(corpus, is_val)})
        sp = _make_tokenizer(data, docs, is_val, journal)
        proto, dtype = sp.serialized_model_proto(), dtype_for_vocab(sp.get_piece_size())
        if tokenize_engine(data.tokenize_engine, sum(len(d) for d in docs), workers) == "ray_data":
            if pool is not None:
                pool.close()
            pool = RayDataTokenizerPool(proto, dtype, workers)
        elif pool is None:
            pool = TokenizerPool(proto, dtype, workers)
        writers, seconds = _tokenize_and_write(data, corpus, is_val, sp, journal, pool)
    finally:
        if pool is not None:
            pool.close()
    manifest = _manifest(data, sp, partial, writers, corpus, corpus_fingerprint)
    write_atomic(partial / MANIFEST, manifest.to_json())
    return manifest, seconds


def _documents_digest(corpus: Corpus, is_val: np.ndarray) -> str:
    """A cheap digest of the documents read (lengths, splits, sources): a journal left by another corpus
    under the same directory name (a corpus edited within a second, a hub data set) is not resumed."""
    digest = hashlib.sha256(np.array([len(d) for d in corpus.documents], dtype=np.int64).tobytes())
    digest.update(is_val.tobytes())
    digest.update(corpus.source_of.tobytes())
    return digest.hexdigest()


def _make_tokenizer(data: DataConfig, docs: list[str], is_val: np.ndarray, journal: ProgressJournal):
    tok = data.tokenizer
    path = journal.directory / TOKENIZER_FILE
    if journal.tokenizer_sha256:
        source = "of the interrupted run"
        log.info("reusing the tokenizer of the interrupted run in %s", journal.directory)
    elif tok.model_path:
        copy_tokenizer(tok.model_path, path)
        source = tok.model_path
    else:
        t0 = time.time()
        train_tokenizer((d for d, v in zip(docs, is_val, strict=True) if not v), tok, path, data.seed)
        log.info("trained a %s tokenizer of %d pieces in %.1fs", tok.type, tok.vocab_size, time.time() - t0)
        source = "trained on the training split"
    sp = load_tokenizer(path)
    step = max(1, len(docs) // _ROUND_TRIP_SAMPLE)
    check_round_trip(sp, [d[:_ROUND_TRIP_CHARS] for d in docs[::step][:_ROUND_TRIP_SAMPLE]], source)
    if not journal.tokenizer_sha256:
        journal.tokenizer_sha256 = sha256_file(path)
        journal.save()
    return sp


def _tokenize_and_write(data: DataConfig, corpus: Corpus, is_val: np.ndarray, sp, journal: ProgressJournal,
                        pool: TokenizerPool):
    dtype = dtype_for_vocab(sp.get_piece_size())
    window = data.context_length + 1
    shard_windows = max(1, data.shard_tokens // window)
    segments = make_segments(corpus.documents, can_cut_documents(sp.serialized_model_proto()))
    piece_val = is_val[segments.document]
    piece_source = corpus.source_of[segments.document]
    n_sources = len(corpus.sources)

    kept = journal.verify_shards(dtype)
    if not journal.checkpoints:
        zeros = {s: 0 for s in SPLITS}
        journal.checkpoints.append(Checkpoint(0, dict(zeros), dict(zeros), {s: [0] * n_sources for s in SPLITS}))
        journal.save()
    start = journal.restart_point()
    writers = {}
    for split in SPLITS:
        shards = ShardWriter(journal.directory, split, window, dtype, shard_windows, journal.shards[split])
        journal.shards[split] = shards.shards  # the journal always lists what the writer has written
        done = sum(x.n_tokens for x in shards.shards)
        writers[split] = SplitWriter(
            WindowPacker(window, sp.eos_id(), dtype), shards, start.documents[split], start.tokens[split],
            np.array(start.source_tokens[split], dtype=np.int64), skip_tokens=done - start.tokens[split],
        )
    if kept or start.segment:
        log.info("resuming an interrupted run: reused %d complete shards (%s); tokenizing again from piece %d "
                 "of %d", kept, ", ".join(f"{s} {len(journal.shards[s])}" for s in SPLITS), start.segment,
                 len(segments))

    blocks = make_blocks(segments, piece_val, pool.workers, start.segment)
    ranges = [(b["first"], b["stop"]) for b in blocks]
    log.info("tokenizing %d documents in %d blocks with %d Ray actors (%s)", len(corpus.documents), len(blocks),
             pool.workers, pool.engine)
    done_chars = sum(len(t) for t in segments.texts[: start.segment])
    progress = TokenizeProgress(sum(len(t) for t in segments.texts), done_chars)
    for row in pool.map(blocks):
        first, stop = ranges[row["block"]]
        written = sum(len(w.shards.shards) for w in writers.values())
        tokens = 0
        for split in SPLITS:
            mine = piece_val[first:stop] == (split == "validation")
            per_source = np.bincount(piece_source[first:stop][mine], weights=row[f"{split}_lengths"],
                                     minlength=n_sources)
            stream = row[split]
            writers[split].add(stream, int(segments.ends_document[first:stop][mine].sum()), per_source.astype(np.int64))
            tokens += len(stream)
        journal.checkpoints.append(Checkpoint(
            stop, {s: w.tokens for s, w in writers.items()}, {s: w.documents for s, w in writers.items()},
            {s: w.source_tokens.tolist() for s, w in writers.items()},
        ))
        if sum(len(w.shards.shards) for w in writers.values()) > written:
            journal.save()
        progress.update(sum(len(t) for t in segments.texts[first:stop]), tokens)
    progress.close()
    for writer in writers.values():
        writer.shards.close()
    journal.save()
    _check_splits(data, writers, window)
    if data.keep_doc_boundaries:
        for split, writer in writers.items():
            _write_doc_starts(journal.directory, split, writer, sp.eos_id())
    return writers, progress.seconds


class TokenizeProgress:
    """A progress bar on stderr (when it is a terminal) and a log line every few seconds, with tokens/s."""

    def __init__(self, total_chars: int, done_chars: int):
        from tqdm import tqdm

        self.t0 = self.last_log = time.time()
        self.total_chars, self.done_chars, self.tokens = total_chars, done_chars, 0
        self.bar = tqdm(total=total_chars, initial=done_chars, unit="char", unit_scale=True, desc="tokenize",
                        file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def update(self, chars: int, tokens: int) -> None:
        self.done_chars += chars
        self.tokens += tokens
        rate = self.tokens / max(self.seconds, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tokens/s", refresh=False)
        self.bar.update(chars)
        if time.time() - self.last_log > _PROGRESS_INTERVAL_S:
            log.info("tokenized %.1f%% of the corpus: %d tokens (%.0f tokens/s)",
                     100 * self.done_chars / max(self.total_chars, 1), self.tokens, rate)
            self.last_log = time.time()

    def close(self) -> None:
        self.bar.close()


def _check_splits(data: DataConfig, writers: dict[str, SplitWriter], window: int) -> None:
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


def _write_doc_starts(directory: Path, split: str, writer: SplitWriter, eos_id: int) -> None:
    """The offsets in the split's window stream where documents start: 0 and just after every EOS (the
    tokenizer never emits EOS inside a document), read back from the shards."""
    starts, offset = [np.zeros(1, dtype=np.int64)], 0
    for info in writer.shards.shards:
        tokens = np.memmap(directory / info.file, dtype=writer.shards.dtype, mode="r", offset=HEADER_BYTES,
                           shape=(info.n_tokens,))
        starts.append(np.flatnonzero(tokens == eos_id).astype(np.int64) + offset + 1)
        offset += info.n_tokens
    starts = np.concatenate(starts)
    buffer = io.BytesIO()
    np.save(buffer, starts[starts < offset])
    write_atomic(directory / f"{split}_doc_starts.npy", buffer.getvalue())


def _manifest(data: DataConfig, sp, directory: Path, writers: dict[str, SplitWriter], corpus: Corpus,
              corpus_fingerprint: str) -> Manifest:
    window = data.context_length + 1
    shards = {s: w.shards.shards for s, w in writers.items()}
    report = corpus.report
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
            path = directory / f"{split}_doc_starts.npy"
            doc_starts[split] = {"file": path.name, "n_documents": int(np.load(path).shape[0]),
                                 "sha256": sha256_file(path)}
    total_tokens = max(1, sum(w.tokens for w in writers.values()))
    sources = []
    for i, src in enumerate(corpus.sources):
        tokens = {s: int(w.source_tokens[i]) for s, w in writers.items()}
        sources.append({
            "name": src.name, "kind": src.kind, "path": src.path, "weight": src.weight, "files": src.files,
            "documents_read": src.documents_read, "documents": src.documents, "tokens": tokens,
            "token_share": round(sum(tokens.values()) / total_tokens, 6),
        })
    return Manifest(
        format_version=FORMAT_VERSION, vocab_size=sp.get_piece_size(), dtype=dtype_for_vocab(sp.get_piece_size()).str,
        window_length=window, tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(directory / TOKENIZER_FILE),
        bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(),
        splits=shards, stats=stats, config=_config_record(data), doc_starts=doc_starts,
        source={"kind": data.source, "path": data.path if data.source != "mixture" else None, "files": report.files,
                "corpus_fingerprint": corpus_fingerprint, "sources": sources},
    )


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished partial directory to its final name (the lock is held by the caller)."""
    for name in (JOURNAL, LOCK):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)  # an incomplete leftover (complete ones are found before the lock is taken)
    os.replace(partial, out)


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
    if manifest.source.get("kind") == "mixture":
        for src in manifest.source["sources"]:
            log.info("  source %s (weight %g): %d of %d documents, %d tokens (%.1f%% of the mix)", src["name"],
                     src["weight"], src["documents"], src["documents_read"], sum(src["tokens"].values()),
                     100 * src["token_share"])
