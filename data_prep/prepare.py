"""The prepare stage: corpus -> partitions -> tokenizer -> per-partition shards on the workers -> manifest.

Outputs land in a directory named by a fingerprint of the data config and of its input files (their names,
sizes and modification times, or contents for a small corpus: data_prep.mixture.corpus_record), so a changed
config or corpus never writes over an old data set. The directory is built as `<name>-<fingerprint>.partial/`
under a lock and renamed when complete; a re-run with the same config finds it finished and skips the work.

The driver only plans and merges; no process ever holds the corpus:

    plan       data_prep.partitions: file names and sizes cut into partitions of data.partition_bytes (the
               same partitions whatever the number of workers or nodes)
    tokenizer  data.tokenizer.model_path, or trained on a bounded, seeded sample drawn on the workers: each
               sampled partition returns its data.tokenizer.sample_sentences training sentences of smallest
               seeded hash, the driver keeps the smallest of all (the same sample whatever the partitioning
               of the work; SentencePiece's own sampling, which ignores the seed, is off)
    shards     data_prep.partition_work on the workers (Ray Data or Ray actors: data_prep.workers): each
               partition read, split by hash, tokenized, packed and written as its own shards, then its record
    manifest   the records in partition order: shards, statistics per split and per source, document starts
               and the training split's token counts (the unigram baseline), merged file by file

Killed at any point (kill -9 included), the same command resumes: partitions with a record are kept, shards
without one are deleted and their partitions done again, and the bytes are those of an uninterrupted run.

A mixture (data.source=mixture) is prepared source by source: one tokenizer for all of them (data.tokenizer.
model_path, a prepared source's, or trained once on a sample of every source, weights aside, in
`<name>.tokenizer-<fingerprint>/`), then each source as its own data set (`<name>.<source>-<fingerprint>/`,
exactly what `pipeline prepare` of that source alone with that tokenizer writes), then the blend recipe
(data_prep.blend) that names them with their weights. A new weight writes a new recipe and tokenizes nothing.

Memory: a worker holds one block of text (data.block_bytes) and its tokens at a time, plus one shard being
written; the driver holds the plan (a few hundred bytes per partition), the tokenizer sample (at most
sample_sentences lines) and one partition record at a time. None of it grows with the corpus but the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np

from data_prep.blend import BLEND_VERSION, adopt_dataset, blend_incomplete_reason, is_blend, write_blend
from data_prep.decode_report import REPORTED_FILES, DecodeReport, most
from data_prep.encoding import can_cut_documents, pool_size, tokenize_engine
from data_prep.errors import DataPrepError, SourceError
from data_prep.listing import OutsideLinks, source_configs, warn_outside_links
from data_prep.mixture import corpus_record
from data_prep.partition_work import (
    PARTS_DIR,
    PartitionRecord,
    PrepareContext,
    bottom_k,
    partition_documents,
    partition_files,
    record_path,
    save_npy,
    shard_prefix,
)
from data_prep.partitions import Partition, plan_partitions, source_field
from data_prep.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    ShardError,
    ShardInfo,
    dtype_for_vocab,
    incomplete_reason,
    load_manifest,
    sha256_file,
    shard_bytes,
)
from data_prep.tokenizer import check_round_trip, copy_tokenizer, load_tokenizer, train_tokenizer_on_sample
from data_prep.workers import run_actors, run_partitions
from pipeline.cluster.storage import ObjectStore, dataset_rel
from pipeline.config import DataConfig, fingerprint, validate_data
from pipeline.containment import plain_name
from pipeline.files import LOCK, write_atomic

log = logging.getLogger(__name__)

# Fields that do not change the bytes written.
_NOT_IN_FINGERPRINT = ("num_workers", "tokenize_engine", "output_dir", "verify_checksums", "block_bytes")
# Bump when the same config would produce different bytes (reading, tokenizer training, packing), so that
# a new recipe gets a new directory instead of silently reusing data sets made by the old one.
RECIPE_VERSION = 5
# Documents of the first partition checked for a tokenizer round trip, and characters of each.
_ROUND_TRIP_SAMPLE, _ROUND_TRIP_CHARS = 64, 1 << 14
_PROGRESS_INTERVAL_S = 5.0
PARTIAL_SUFFIX = ".partial"
STATE = "prepare_state.json"  # in the partial directory: the plan's digest and the tokenizer's sha256
TOKEN_COUNTS = "train_token_counts.npy"


def data_fingerprint(data: DataConfig, corpus: list[dict] | None = None) -> str:
    """Fingerprint of what shapes the bytes: the config (less worker count and location), the format and
    recipe versions, and the input files (corpus_record, computed here unless given)."""
    record = {**_config_record(data), "format_version": FORMAT_VERSION, "recipe_version": RECIPE_VERSION,
              "corpus": corpus_record(data) if corpus is None else corpus}
    model = Path(data.tokenizer.model_path).expanduser() if data.tokenizer.model_path else None
    if model is not None and model.is_file():  # a given tokenizer by content: a changed file, a new data set
        record["tokenizer"] = {**record["tokenizer"], "model_path": f"sha256:{sha256_file(model)}"}
    return fingerprint(record)


def _config_record(data: DataConfig) -> dict:
    """The data config as recorded in the manifest: only what shapes the bytes, so that the manifest is
    identical whatever the worker count or output location."""
    fields = dataclasses.asdict(data)
    for key in _NOT_IN_FINGERPRINT:
        fields.pop(key)
    return fields


def dataset_dir(data: DataConfig, corpus: list[dict] | None = None) -> Path:
    """The directory of this config's data set (a mixture's: its blend), known without preparing it."""
    plain_name(data.name, "data.name")  # the directory lies below data.output_dir
    if data.source == "mixture":
        return blend_dir(data)
    return Path(data.output_dir) / f"{data.name}-{data_fingerprint(data, corpus)}"


def is_complete(out: Path) -> bool:
    return (blend_incomplete_reason(out) if is_blend(out) else incomplete_reason(out)) is None


# Receives the progress of a data set being prepared: (label, metrics, step); label is "" for a single data
# set and the source's name within a mixture (pipeline.stages logs these to MLflow).
ProgressSink = Callable[[str, dict[str, float], int], None]


def prepare(data: DataConfig, sink: ProgressSink | None = None, label: str = "", store: ObjectStore | None = None) -> Path:
    """Prepare the data set of this config (or find it prepared) and return its directory. `sink` receives the
    progress (bytes read, documents, tokens, tokens/s, time left) every few seconds and the totals at the end.
    `store` (cluster.storage_uri): where workers on nodes that do not see output_dir send their partitions."""
    from pipeline.files import directory_lock

    validate_data(data)
    if data.source == "mixture":
        return prepare_mixture(data, sink, store)
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
            manifest, seconds = _build(data, partial, fingerprint(corpus), sink, label, store)
        except ValueError:
            shutil.rmtree(partial, ignore_errors=True)  # the input or the config is at fault: nothing to resume
            raise
        except BaseException:
            _remove_temporaries(partial)  # those of workers stopped mid-write (the next run removes them too)
            log.warning("prepare stopped: the finished partitions stay in %s; run the same command again to "
                        "resume", partial)
            raise
        _publish(partial, out)
        if store is not None:
            store.delete_dir(dataset_rel(partial))  # the staged records of workers that uploaded theirs
    _log_summary(out, manifest, time.time() - started, seconds)
    if sink is not None:
        stats = manifest.stats
        tokens = sum(stats["tokens"].values())
        sink(label, {"total_s": time.time() - started, "tokenize_s": seconds, "tokens": tokens,
                     "tokens_per_s": tokens / max(seconds, 1e-9), "documents": sum(stats["documents"].values()),
                     "train_windows": stats["windows"]["train"], "validation_windows": stats["windows"]["validation"],
                     "partitions": stats["partitions"], "binary_files_skipped": len(stats["binary_files_skipped"]),
                     "undecodable_bytes": stats["undecodable_bytes"],
                     "nul_documents_skipped": stats["nul_documents_skipped"],
                     "outside_links_skipped": len(stats["outside_links_skipped"])}, stats["partitions"])
    return out


def _already_prepared(data: DataConfig, out: Path) -> bool:
    if incomplete_reason(out) is not None:
        return False
    log.info("data set %s is already prepared (manifest and shards complete): skipping", out)
    return True


def _build(data: DataConfig, partial: Path, corpus_fingerprint: str, sink: ProgressSink | None = None,
           label: str = "", store: ObjectStore | None = None) -> tuple[Manifest, float]:
    t0 = time.time()
    links = OutsideLinks(data.on_outside_link)
    plan = plan_partitions(data, links)
    sources = source_configs(data)
    n_files = len({piece.path for part in plan for piece in part.pieces})
    log.info("planned %d partitions of %s over %d inputs in %.1fs", len(plan),
             _size(sum(p.size for p in plan)), n_files, time.time() - t0)
    warn_outside_links(links.skipped)
    state = _open_state(partial, plan)
    workers = pool_size(data.num_workers)
    ctx = PrepareContext(data=data, sources=sources, wheres=[source_field(data, i) for i in range(len(sources))],
                         directory=str(partial), tokenizer_proto=b"", dtype="", vocab_size=0, eos_id=0,
                         cut_documents=False)
    sp = _make_tokenizer(data, plan, ctx, state, workers)
    proto = sp.serialized_model_proto()
    ctx = dataclasses.replace(ctx, tokenizer_proto=proto, dtype=dtype_for_vocab(sp.get_piece_size()).str,
                              vocab_size=sp.get_piece_size(), eos_id=sp.eos_id(), cut_documents=can_cut_documents(proto))
    if store is not None:
        ctx = dataclasses.replace(ctx, store_uri=store.uri, store_rel=dataset_rel(partial.with_name(
            partial.name.removesuffix(PARTIAL_SUFFIX))), staging_rel=dataset_rel(partial))
        _fetch_staged(store, ctx, plan)
    todo = _unfinished(partial, plan, ctx.dtype)
    engine = tokenize_engine(data.tokenize_engine, sum(p.size for p in todo), workers)
    if len(todo) < len(plan):
        log.info("resuming an interrupted run: %d of %d partitions are done", len(plan) - len(todo), len(plan))
    log.info("tokenizing %d partitions with %d Ray workers (%s)", len(todo), min(workers, max(1, len(todo))), engine)
    ctx = dataclasses.replace(ctx, driver_mark=f".driver-{uuid.uuid4().hex[:12]}")
    progress = Progress(sum(p.size for p in todo), len(todo), sink, label)
    nodes = set()
    try:
        check_shared(partial, ctx, store)
        for part, record in run_partitions(ctx, todo, workers, engine):
            if store is not None and not record_path(partial, part.index).is_file():
                _fetch_partition(store, ctx, record)  # written on a node that does not see this directory
            progress.update(part, record)
            nodes.add(record.node)
    finally:
        (partial / ctx.driver_mark).unlink(missing_ok=True)
    progress.close()
    if todo:
        log.info("tokenized %d partitions on %d Ray nodes", len(todo), len(nodes))
    manifest = _merge(data, sp, partial, plan, corpus_fingerprint, links.skipped)
    write_atomic(partial / MANIFEST, manifest.to_json())
    return manifest, progress.seconds


def check_shared(directory: Path, ctx: PrepareContext, store: ObjectStore | None) -> None:
    """Workers write their partitions' shards into `directory`. Writes the driver's mark there (the caller
    deletes it when the partitions are done) and looks for it from each Ray node: a node that does not see it
    stops the run before any work, naming the fix, unless there is an object store for its workers to upload to
    (data_prep.partition_work.upload_partition)."""
    import ray

    write_atomic(Path(directory) / ctx.driver_mark, b"")
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0] if ray.is_initialized() else []
    if len(nodes) <= 1:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sees = ray.remote(num_cpus=0)(lambda path: os.path.exists(path))
    seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(Path(directory) / ctx.driver_mark)) for n in nodes])
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind and store is None:
        raise DataPrepError(
            f"the Ray nodes {', '.join(blind)} do not see {directory}: prepare's workers write the shards there, so "
            f"data.output_dir (output_dir) must be on storage that every node mounts at the same path (NFS, Lustre, "
            f"a shared volume), or set cluster.storage_uri (workers on such nodes then upload their shards to it), "
            f"or run prepare on one node (cluster=local)"
        )
    if blind:
        log.info("the Ray nodes %s do not see %s: their workers upload their partitions to %s, and this node "
                 "downloads them", ", ".join(blind), directory, store.path(ctx.store_rel))


def _fetch_partition(store: ObjectStore, ctx: PrepareContext, record: PartitionRecord) -> None:
    """Download a partition that a worker uploaded (shards checked against their sha256 on the way), the record
    last, into the driver's directory."""
    digests = {info.file: info.sha256 for infos in record.shards.values() for info in infos}
    for name in partition_files(record):
        rel = ctx.staging_rel if name.startswith(f"{PARTS_DIR}/") else ctx.store_rel
        store.download_file(f"{rel}/{name}", Path(ctx.directory) / name, digests.get(name))


def _fetch_staged(store: ObjectStore, ctx: PrepareContext, plan: list[Partition]) -> None:
    """On a resume: partitions that workers of a killed run uploaded but this node never downloaded (a record in
    the staging prefix and every shard it lists in the store at its size) are downloaded, not done again."""
    staged = store.files(f"{ctx.staging_rel}/{PARTS_DIR}")
    if not staged:
        return
    uploaded = store.files(ctx.store_rel)
    fetched = 0
    for part in plan:
        local = record_path(Path(ctx.directory), part.index)
        if local.is_file() or local.name not in staged:
            continue
        try:
            record = PartitionRecord.from_json(store.read_text(f"{ctx.staging_rel}/{PARTS_DIR}/{local.name}"),
                                               part.index)
        except (ValueError, TypeError, KeyError) as err:  # not a record a worker wrote: the partition is done again
            log.warning("ignoring the staged record %s in the store (%s): tokenizing partition %d again",
                        local.name, err, part.index)
            continue
        if all(uploaded.get(info.file) == shard_bytes(info, ctx.dtype) for infos in record.shards.values()
               for info in infos):
            _fetch_partition(store, ctx, record)
            fetched += 1
    if fetched:
        log.info("downloaded %d partitions that workers of the interrupted run uploaded to %s", fetched, store.uri)


def _plan_digest(plan: list[Partition]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(p) for p in plan], sort_keys=True).encode()).hexdigest()


def _open_state(partial: Path, plan: list[Partition]) -> dict:
    """The state an interrupted run left for this plan, or a fresh one (the directory emptied but the lock)."""
    digest = _plan_digest(plan)
    try:
        state = json.loads((partial / STATE).read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("plan") != digest:
        for path in partial.iterdir() if partial.is_dir() else []:
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        state = {"plan": digest}
        partial.mkdir(parents=True, exist_ok=True)
        write_atomic(partial / STATE, json.dumps(state))
    return state


def _unfinished(partial: Path, plan: list[Partition], dtype: str) -> list[Partition]:
    """The partitions to (re)do: those without a record, or whose recorded files are missing or not of the
    recorded size. Their shards (a killed run's) and every temporary file a killed writer left are deleted."""
    _remove_temporaries(partial)
    todo = [p for p in plan if not _recorded_intact(partial, p.index, dtype)]
    for part in todo:
        record_path(partial, part.index).unlink(missing_ok=True)
        for split in SPLITS:
            for stray in partial.glob(f"{shard_prefix(split, part.index)}-*.bin"):
                stray.unlink()
    return todo


def _recorded_intact(partial: Path, index: int, dtype: str) -> bool:
    try:
        record = PartitionRecord.from_json(record_path(partial, index).read_text(), index)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    shards_ok = all((partial / info.file).is_file() and (partial / info.file).stat().st_size == shard_bytes(info, dtype)
                    for infos in record.shards.values() for info in infos)
    parts = [record.token_counts, *record.doc_starts.values()]
    return shards_ok and all((partial / PARTS_DIR / name).is_file() for name in parts if name)


def _remove_temporaries(directory: Path) -> None:
    """write_atomic's temporary files (.<name>.tmp<pid>), partial downloads (.<name>.download-<id>) and the
    driver's mark (.driver-<id>) that a killed run left behind."""
    for folder in (directory, directory / PARTS_DIR):
        for pattern in (".*.tmp*", ".*.download-*", ".driver-*"):
            for tmp in folder.glob(pattern) if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)


def _sample_partitions(plan: list[Partition], data: DataConfig) -> list[Partition]:
    """Whole partitions in a seeded order until they hold data.tokenizer.sample_bytes of input."""
    key = lambda p: hashlib.sha256(f"{data.seed}:{p.index}".encode()).digest()  # noqa: E731
    chosen, size = [], 0
    for part in sorted(plan, key=key):
        if size >= data.tokenizer.sample_bytes and chosen:
            break
        chosen.append(part)
        size += max(part.size, 1)
    return sorted(chosen, key=lambda p: p.index)


def _make_tokenizer(data: DataConfig, plan: list[Partition], ctx: PrepareContext, state: dict, workers: int):
    tok = data.tokenizer
    path = Path(ctx.directory) / TOKENIZER_FILE
    if state.get("tokenizer_sha256") and path.is_file() and sha256_file(path) == state["tokenizer_sha256"]:
        log.info("reusing the tokenizer of the interrupted run in %s", ctx.directory)
        source = "of the interrupted run"
    elif tok.model_path:
        copy_tokenizer(tok.model_path, path)
        source = tok.model_path
    else:
        t0 = time.time()
        sample = _draw_sample(plan, ctx, data, workers)
        log.info("drew a tokenizer sample of %d sentences from %d partitions in %.1fs", len(sample),
                 len(_sample_partitions(plan, data)), time.time() - t0)
        t0 = time.time()
        train_tokenizer_on_sample((s for _, s in sample), tok, path, data.seed)
        log.info("trained a %s tokenizer of %d pieces in %.1fs", tok.type, tok.vocab_size, time.time() - t0)
        source = "trained on a sample of the training split"
    sp = load_tokenizer(path)
    check_round_trip(sp, _round_trip_texts(plan, ctx), source)
    if state.get("tokenizer_sha256") != sha256_file(path):
        state["tokenizer_sha256"] = sha256_file(path)
        write_atomic(Path(ctx.directory) / STATE, json.dumps(state))
    return sp


def _draw_sample(plan: list[Partition], ctx: PrepareContext, data: DataConfig, workers: int) -> list[tuple[int, str]]:
    """The bottom-k training sentences by seeded hash over the sampled partitions."""
    k = data.tokenizer.sample_sentences
    samples = run_actors(ctx, _sample_partitions(plan, data), workers, "sample", k)
    sample = bottom_k((pair for _, part_sample in samples for pair in part_sample), k)
    if not sample:
        raise SourceError("the corpus holds no text to train the tokenizer on (its training split is empty, or "
                          "every input was empty or skipped as binary): point data.path at files with text in them")
    return sample


def _round_trip_texts(plan: list[Partition], ctx: PrepareContext) -> list[str]:
    docs = islice(partition_documents(plan[0], ctx, DecodeReport()), _ROUND_TRIP_SAMPLE) if plan else []
    return [d[:_ROUND_TRIP_CHARS] for d in docs]


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


def _merge(data: DataConfig, sp, directory: Path, plan: list[Partition], corpus_fingerprint: str,
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
    for part in plan:
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
    report.files = len({piece.path for part in plan for piece in part.pieces})
    report.log_summary()
    if sum(s["documents_read"] for s in per_source) == 0:
        raise SourceError(f"the corpus holds no non-empty document ({report.files} inputs read"
                          + (f", {len(report.binary_files)} skipped as binary" if report.binary_files else "")
                          + "): point data.path at files with text in them")
    _check_splits(data, shards, totals)
    doc_starts = _merge_doc_starts(directory, starts_parts) if data.keep_doc_boundaries else {}
    save_npy(directory / TOKEN_COUNTS, counts if counts is not None else np.zeros(sp.get_piece_size(), np.int64))
    window = data.context_length + 1
    stats = {**totals, "windows": {s: sum(x.n_windows for x in shards[s]) for s in SPLITS}, **_input_stats(report),
             "partitions": len(plan), "empty_partitions": empty}
    total_tokens = max(1, sum(totals["tokens"].values()))
    source_entries = []
    for src, s in zip(sources, per_source, strict=True):
        source_entries.append({
            "name": src.name, "kind": src.source, "path": src.path,
            "files": len(s["files"]),
            "documents_read": s["documents_read"], "documents": s["documents"], "tokens": s["tokens"],
            "token_share": round(sum(s["tokens"].values()) / total_tokens, 6),
        })
    return Manifest(
        format_version=FORMAT_VERSION, vocab_size=sp.get_piece_size(), dtype=dtype_for_vocab(sp.get_piece_size()).str,
        window_length=window, tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_file(directory / TOKENIZER_FILE),
        bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(),
        splits=shards, stats=stats, config=_config_record(data), doc_starts=doc_starts,
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


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished partial directory to its final name (the lock is held by the caller)."""
    shutil.rmtree(partial / PARTS_DIR, ignore_errors=True)
    _remove_temporaries(partial)
    for name in (STATE, LOCK):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)  # an incomplete leftover (complete ones are found before the lock is taken)
    os.replace(partial, out)


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


# --- mixtures: one tokenizer, one data set per source, a blend recipe (data_prep.blend) ---------------------

def _sources_to_prepare(data: DataConfig) -> DataConfig:
    """The mixture's sources that are corpora (not prepared data sets), weights aside: what the shared
    tokenizer is trained on, so that no weight changes it."""
    return dataclasses.replace(data, mixture=[dataclasses.replace(src, weight=1.0) for src in data.mixture
                                              if not src.dataset])


def tokenizer_dir(data: DataConfig) -> Path:
    """Named by what shapes the tokenizer: the corpora, data.tokenizer, the seed and the split (it is trained
    on the training split), not the context length or the shard size."""
    shape = dataclasses.replace(_sources_to_prepare(data), context_length=0, shard_tokens=0, keep_doc_boundaries=False)
    return Path(data.output_dir) / f"{data.name}.tokenizer-{data_fingerprint(shape)}"


def shared_tokenizer(data: DataConfig) -> Path:
    """Where the mixture's tokenizer is (or will be once trained): data.tokenizer.model_path, else the first
    prepared data set's, else the one trained for this mixture."""
    if data.tokenizer.model_path:
        return Path(data.tokenizer.model_path).expanduser().resolve()
    for src in data.mixture:
        if src.dataset:
            return load_manifest(Path(src.dataset).expanduser()).tokenizer_path
    return tokenizer_dir(data) / TOKENIZER_FILE


def component_config(data: DataConfig, index: int, tokenizer: Path | None) -> DataConfig:
    """The single-source config of data.mixture[index], with the mixture's tokenizer: preparing it alone
    (`pipeline prepare data.source=... data.tokenizer.model_path=...`) writes the same shards."""
    src = data.mixture[index]
    return dataclasses.replace(
        data, name=f"{data.name}.{src.name}", source=src.source, path=src.path, text_field=src.text_field,
        doc_split=src.doc_split, hf_config=src.hf_config, hf_revision=src.hf_revision, hf_split=src.hf_split,
        mixture=[], tokenizer=dataclasses.replace(data.tokenizer, model_path=str(tokenizer) if tokenizer else None),
    )


def blend_parts(data: DataConfig) -> list[tuple[str, Path, float]]:
    """(name, data set directory, weight) of every source, once the shared tokenizer exists (a data set
    made with a given tokenizer is named by the tokenizer's content)."""
    tokenizer = shared_tokenizer(data)
    parts = []
    for i, src in enumerate(data.mixture):
        path = Path(src.dataset).expanduser().resolve() if src.dataset else dataset_dir(
            component_config(data, i, tokenizer))
        parts.append((src.name, path, src.weight))
    return parts


def tokenizer_identity(data: DataConfig) -> str:
    """The mixture's tokenizer, known before it is trained: a given file's sha256, a prepared source's, or the
    name (recipe fingerprint) of the one trained for this mixture."""
    if data.tokenizer.model_path:
        return f"sha256:{sha256_file(Path(data.tokenizer.model_path).expanduser())}"
    for src in data.mixture:
        if src.dataset:
            return f"sha256:{load_manifest(Path(src.dataset).expanduser()).tokenizer_sha256}"
    return tokenizer_dir(data).name


def blend_dir(data: DataConfig) -> Path:
    """The blend's directory, named by its recipe (known before anything is prepared): the tokenizer, each
    source (a prepared data set by directory, a corpus by its data set's fingerprint less the tokenizer) and the
    weights."""
    parts = []
    for i, src in enumerate(data.mixture):
        what = (str(Path(src.dataset).expanduser().resolve()) if src.dataset
                else data_fingerprint(component_config(data, i, None)))
        parts.append([src.name, what, src.weight])
    recipe = {"blend_version": BLEND_VERSION, "recipe_version": RECIPE_VERSION, "tokenizer": tokenizer_identity(data),
              "parts": parts}
    return Path(data.output_dir) / f"{data.name}-{fingerprint(recipe)}"


def prepare_mixture(data: DataConfig, sink: ProgressSink | None = None, store: ObjectStore | None = None) -> Path:
    """The blend of data.mixture: its tokenizer and its sources' data sets prepared where missing (each
    resumable like any data set), then the recipe. Returns the blend's directory."""
    from pipeline.files import directory_lock

    out = blend_dir(data)
    if is_complete(out):
        log.info("blend %s is already prepared: skipping", out)
        return out
    tokenizer = shared_tokenizer(data)
    if not tokenizer.is_file() and not data.tokenizer.model_path and not any(src.dataset for src in data.mixture):
        _prepare_tokenizer(_sources_to_prepare(data), tokenizer.parent)
    parts = []
    for i, (name, path, weight) in enumerate(blend_parts(data)):
        if data.mixture[i].dataset:
            reason = incomplete_reason(path)
            if reason is not None:
                raise DataPrepError(f"data.mixture.{i}.dataset={data.mixture[i].dataset} is not a complete data set "
                                    f"({reason}): prepare it again, or point the entry at its source instead")
            path = adopt_dataset(path, out.parent, f"{data.name}.{name}")  # a blend names only its neighbours
        else:
            log.info("mixture %s: source %s", data.name, name)
            path = prepare(component_config(data, i, tokenizer), sink, name, store)
        parts.append((name, path, weight))
    out.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(out.with_name(out.name + PARTIAL_SUFFIX)):
        try:
            blend = write_blend(out, parts)
        except (ValueError, ShardError) as err:
            raise DataPrepError(str(err)) from err
    shutil.rmtree(out.with_name(out.name + PARTIAL_SUFFIX), ignore_errors=True)
    for component in blend.components:
        log.info("blend %s: %s, weight %g (share %.1f%%), %d training windows", out.name, component.name,
                 component.weight, 100 * component.share, component.windows.get("train", 0))
    return out


def _prepare_tokenizer(data: DataConfig, out_dir: Path) -> Path:
    """Train the mixture's tokenizer on a seeded, bounded sample of all its sources (as a single data set's
    is trained) into out_dir, unless it is there; resumable and locked like a data set."""
    from pipeline.files import directory_lock

    path = out_dir / TOKENIZER_FILE
    if path.is_file():
        return path
    partial = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(partial):
        if path.is_file():
            shutil.rmtree(partial, ignore_errors=True)
            return path
        plan = plan_partitions(data)
        sources = source_configs(data)
        state = _open_state(partial, plan)
        ctx = PrepareContext(data=data, sources=sources, wheres=[source_field(data, i) for i in range(len(sources))],
                             directory=str(partial), tokenizer_proto=b"", dtype="", vocab_size=0, eos_id=0,
                             cut_documents=False)
        _make_tokenizer(data, plan, ctx, state, pool_size(data.num_workers))
        _publish(partial, out_dir)
    return path
