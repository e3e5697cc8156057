"""The build of one single-source data set: corpus -> partitions -> tokenizer -> per-partition shards on the workers ->
manifest, in `<name>-<fingerprint>.partial/` under its lock, renamed when complete (data_prep.dataset_dirs).

    partition  data_prep.partitions, on the driver from file names and sizes
    state      data_prep.partial: the partial directory of an interrupted run of the same partitioning is resumed
    tokenizer  data_prep.tokenizer_setup: reused, copied, or trained on a sample drawn on the workers
    shards     data_prep.partition_work on the workers (data_prep.workers), the partitions not done yet; those of
               nodes that do not see the directory come through the object store (data_prep.dataset_store)
    manifest   data_prep.merge, the records in partition order

Stopped by anything but bad input (a bug, an outage, a full disk, a Ctrl-C, kill -9), the build leaves its finished
partitions in the partial directory and the same command resumes it; an error that says the corpus or the config
is at fault (BAD_INPUT) deletes the partial directory, as there is nothing worth resuming.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from data_prep.dataset_dirs import dataset_dir, partial_dir
from data_prep.dataset_store import check_shared, drop_staged, fetch_partition, fetch_staged
from data_prep.encoding import pool_size, tokenize_engine
from data_prep.errors import DataPrepError, SourceError
from data_prep.listing import OutsideLinks, warn_outside_links
from data_prep.merge import merge_manifest
from data_prep.mixture import corpus_record
from data_prep.partial import open_state, publish, remove_temporaries, unfinished
from data_prep.partition_work import PartitionRecord, PrepareContext, ReadContext, record_path
from data_prep.partitions import Partition, partition_inputs
from data_prep.shards import MANIFEST, Manifest, dtype_for_vocab, incomplete_reason
from data_prep.text_tokenizer import TextTokenizer
from data_prep.tokenizer import TokenizerError
from data_prep.tokenizer_setup import make_tokenizer
from data_prep.workers import run_partitions
from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.config import ConfigError, DataConfig, fingerprint, validate_data
from pipeline.containment import ContainmentError
from pipeline.files import write_atomic

log = logging.getLogger("data_prep.prepare")  # the stage's one log, whichever module writes the line

_PROGRESS_INTERVAL_S = 5.0
# The errors that say the corpus or the config is at fault: a build stopped by one of them deletes its partial
# directory. Any other error (a bug, an outage, a full disk, an interruption) leaves it to be resumed.
BAD_INPUT = (ConfigError, ContainmentError, DataPrepError, SourceError, TokenizerError)

# Receives the progress of a data set being prepared: (label, metrics, step); label is "" for a single data
# set and the source's name within a mixture (pipeline.stages logs these to MLflow).
ProgressSink = Callable[[str, dict[str, float], int], None]


def prepare_source(data: DataConfig, sink: ProgressSink | None = None, label: str = "",
                   mirror: Mirror = NO_MIRROR) -> Path:
    """Prepare the data set of this single-source config (or find it prepared) and return its directory; `sink`,
    `label` and `mirror` as for data_prep.prepare.prepare."""
    from pipeline.files import directory_lock

    validate_data(data)
    corpus = corpus_record(data)
    out = dataset_dir(data, corpus)
    if _already_prepared(data, out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_dir(out)
    with directory_lock(partial):
        if _already_prepared(data, out):  # another run finished it while this one waited
            shutil.rmtree(partial, ignore_errors=True)
            return out
        if out.exists():
            log.info("%s exists but is incomplete (%s): preparing it again", out, incomplete_reason(out))
        started = time.time()
        try:
            manifest, seconds = _build(data, partial, fingerprint(corpus), sink, label, mirror)
        except BAD_INPUT:
            shutil.rmtree(partial, ignore_errors=True)  # the input or the config is at fault: nothing to resume
            raise
        except BaseException:
            remove_temporaries(partial)  # those of workers stopped mid-write (the next run removes them too)
            log.warning("prepare stopped: the finished partitions stay in %s; run the same command again to "
                        "resume", partial)
            raise
        publish(partial, out)
        drop_staged(mirror, partial)
    _log_summary(out, manifest, time.time() - started, seconds)
    if sink is not None:
        _report_totals(sink, label, manifest, time.time() - started, seconds)
    return out


def _report_totals(sink: ProgressSink, label: str, manifest: Manifest, total_s: float, seconds: float) -> None:
    stats = manifest.stats
    tokens = sum(stats["tokens"].values())
    sink(label, {"total_s": total_s, "tokenize_s": seconds, "tokens": tokens,
                 "tokens_per_s": tokens / max(seconds, 1e-9), "documents": sum(stats["documents"].values()),
                 "train_windows": stats["windows"]["train"], "validation_windows": stats["windows"]["validation"],
                 "partitions": stats["partitions"], "binary_files_skipped": len(stats["binary_files_skipped"]),
                 "undecodable_bytes": stats["undecodable_bytes"],
                 "nul_documents_skipped": stats["nul_documents_skipped"],
                 "outside_links_skipped": len(stats["outside_links_skipped"])}, stats["partitions"])


def _already_prepared(data: DataConfig, out: Path) -> bool:
    if incomplete_reason(out) is not None:
        return False
    log.info("data set %s is already prepared (manifest and shards complete): skipping", out)
    return True


def _build(data: DataConfig, partial: Path, corpus_fingerprint: str, sink: ProgressSink | None = None,
           label: str = "", mirror: Mirror = NO_MIRROR) -> tuple[Manifest, float]:
    t0 = time.time()
    links = OutsideLinks(data.on_outside_link)
    partitions = partition_inputs(data, links)
    n_files = len({piece.path for part in partitions for piece in part.pieces})
    log.info("planned %d partitions of %s over %d inputs in %.1fs", len(partitions),
             _size(sum(p.size for p in partitions)), n_files, time.time() - t0)
    warn_outside_links(links.skipped)
    state = open_state(partial, partitions)
    workers = pool_size(data.num_workers)
    read = ReadContext.of(data)
    tokenizer = make_tokenizer(partitions, read, partial, state, workers)
    ctx = _context(read, partial, tokenizer, mirror)
    fetch_staged(mirror, ctx, partitions)
    todo = unfinished(partial, partitions, ctx.dtype)
    engine = tokenize_engine(data.tokenize_engine, sum(p.size for p in todo), workers)
    if len(todo) < len(partitions):
        log.info("resuming an interrupted run: %d of %d partitions are done", len(partitions) - len(todo), len(partitions))
    log.info("tokenizing %d partitions with %d Ray workers (%s)", len(todo), min(workers, max(1, len(todo))), engine)
    progress = Progress(sum(p.size for p in todo), len(todo), sink, label)
    nodes = set()
    try:
        check_shared(partial, ctx, mirror)
        for part, record in run_partitions(ctx, todo, workers, engine):
            if not record_path(partial, part.index).is_file():
                fetch_partition(mirror, ctx, record)  # written on a node that does not see this directory
            progress.update(part, record)
            nodes.add(record.node)
    finally:
        (partial / ctx.driver_mark).unlink(missing_ok=True)
    progress.close()
    if todo:
        log.info("tokenized %d partitions on %d Ray nodes", len(todo), len(nodes))
    manifest = merge_manifest(data, tokenizer, partial, partitions, corpus_fingerprint, links.skipped)
    write_atomic(partial / MANIFEST, manifest.to_json())
    return manifest, progress.seconds


def _context(read: ReadContext, partial: Path, tokenizer: TextTokenizer, mirror: Mirror) -> PrepareContext:
    """All that the workers need, once the tokenizer is known: where the shards go, the tokenizer and what follows
    from it, the driver's mark for this run (see check_shared) and the object store, if any."""
    return PrepareContext(
        data=read.data, sources=read.sources, wheres=read.wheres, directory=str(partial),
        tokenizer_file=tokenizer.file_name, tokenizer_bytes=tokenizer.data, specials=tokenizer.specials,
        dtype=dtype_for_vocab(tokenizer.vocab_size).str, vocab_size=tokenizer.vocab_size,
        cut_documents=tokenizer.cut_documents, driver_mark=f".driver-{uuid.uuid4().hex[:12]}", store_uri=mirror.uri,
    )


class Progress:
    """A progress bar on stderr (on a terminal) and a log line every few seconds: bytes, documents, tokens/s and
    the time left."""

    def __init__(self, total_bytes: int, partitions: int, sink: ProgressSink | None = None, label: str = ""):
        from tqdm import tqdm

        self.sink, self.label = sink, label
        self.t0 = self.last_log = time.time()
        self.total_bytes, self.partitions = total_bytes, partitions
        self.bytes = self.tokens = self.documents = self.done = 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
                        disable=not sys.stderr.isatty(), leave=False)

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def update(self, part: Partition, record: PartitionRecord) -> None:
        self.done += 1
        self.bytes += part.size
        self.tokens += sum(record.tokens.values())
        self.documents += record.documents_read
        rate = self.tokens / max(self.seconds, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tokens/s", refresh=False)
        self.bar.update(part.size)
        if record.documents_read == 0:
            log.warning("partition %d (%s) holds no document: its input is empty (or skipped as binary)",
                        part.index, part.describe())
        if time.time() - self.last_log > _PROGRESS_INTERVAL_S or self.done == self.partitions:
            left = self.seconds * (self.total_bytes - self.bytes) / max(self.bytes, 1)
            log.info("prepared %d of %d partitions (%s of %s, %d documents, %d tokens): %.0f tokens/s, %s/s, "
                     "about %.0fs left", self.done, self.partitions, _size(self.bytes), _size(self.total_bytes),
                     self.documents, self.tokens, rate, _size(self.bytes / max(self.seconds, 1e-9)), left)
            self.last_log = time.time()
            if self.sink is not None:
                self.sink(self.label, {"bytes_read": self.bytes, "documents_read": self.documents, "tokens": self.tokens,
                                       "tokens_per_s": rate, "bytes_per_s": self.bytes / max(self.seconds, 1e-9),
                                       "eta_s": left, "partitions_done": self.done}, self.done)

    def close(self) -> None:
        self.bar.close()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def _log_summary(out: Path, manifest: Manifest, seconds: float, tokenize_seconds: float) -> None:
    stats = manifest.stats
    total = sum(stats["tokens"].values())
    log.info(
        "prepared %s in %.1fs: documents %d train / %d validation, tokens %d / %d, windows %d / %d "
        "(of %d tokens), dropped tail tokens %d / %d over %d partitions; tokenized %.0f tokens/s",
        out, seconds, stats["documents"]["train"], stats["documents"]["validation"],
        stats["tokens"]["train"], stats["tokens"]["validation"], stats["windows"]["train"],
        stats["windows"]["validation"], manifest.window_length, stats["dropped_tail_tokens"]["train"],
        stats["dropped_tail_tokens"]["validation"], stats["partitions"], total / max(tokenize_seconds, 1e-9),
    )
