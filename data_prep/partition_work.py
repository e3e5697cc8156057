"""What a worker does with one partition (data_prep.partitions), start to finish, in bounded memory.

    read its documents (data_prep.sources)
    -> split each by the hash of its text (validation below data.val_fraction)
    -> in blocks of data.block_bytes of text: encode (long documents in pieces), join with EOS, count tokens
    -> pack each split's stream into windows of context_length + 1 and write them as the partition's own shards
       (<split>-p<index>-<k>.bin, sha256 computed while writing); the tail shorter than a window is dropped
    -> write the partition's record (parts/p<index>.json, atomically, last) with its shards, counts and
       document starts: a partition is done exactly when its record exists.

A worker on a node that does not see the driver's directory (nodes without a shared file system; it looks for
the driver's mark, a file named per run) writes the partition into its own node's copy of that path, uploads it
to cluster.storage_uri (shards where the finished data set goes, the record and its parts in a staging prefix;
the record last) and deletes its local copy; the driver downloads it from there (data_prep.dataset_store).

Nothing depends on which worker runs a partition or how many there are. A worker killed half-way leaves shards
without a record; the next run deletes them and does the partition again (data_prep.partial). Two workers that
run the same partition (a zombie of a killed run) write the same bytes, each file atomically.

A mixture never reaches here as one: each of its sources is prepared as its own data set and training samples
them by weight (data_prep.blend); only the mixture's shared tokenizer sample reads partitions of several sources.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.decode_report import DecodeReport
from data_prep.encoding import make_segments
from data_prep.listing import source_configs
from data_prep.packing import WindowPacker, join_with_eos
from data_prep.partitions import Partition, source_field
from data_prep.shards import SPLITS, ShardInfo, ShardWriter, finished_dir
from data_prep.sources import piece_documents
from data_prep.text_tokenizer import Specials, TextTokenizer
from pipeline.config import DataConfig, PipelineError, SourceConfig
from pipeline.files import write_atomic

PARTS_DIR = "parts"


def record_path(directory: Path, index: int) -> Path:
    return Path(directory) / PARTS_DIR / f"p{index:06d}.json"


def shard_prefix(split: str, index: int) -> str:
    return f"{split}-p{index:06d}"


def hash_fraction(text: str, salt: bytes = b"") -> float:
    """A stable number in [0, 1) from the text (and a salt) alone: not its position, partition or run."""
    digest = hashlib.sha256(salt + text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(text: str, val_fraction: float) -> bool:
    return hash_fraction(text) < val_fraction


@dataclass
class ReadContext:
    """Plain data a worker needs to read any partition's documents (shipped once per worker): enough to draw the
    tokenizer's sample, before there is a tokenizer."""

    data: DataConfig
    sources: list[SourceConfig]
    wheres: list[str]  # how errors name each source's config entry

    @classmethod
    def of(cls, data: DataConfig) -> ReadContext:
        sources = source_configs(data)
        return cls(data, sources, [source_field(data, i) for i in range(len(sources))])


@dataclass
class PrepareContext(ReadContext):
    """Plain data a worker needs for any partition (shipped once per worker): reading, the tokenizer, and where the
    shards go. Built once the driver has the tokenizer (data_prep.build)."""

    directory: str
    tokenizer_file: str  # the tokenizer's file name in a data set and its bytes (data_prep.text_tokenizer)
    tokenizer_bytes: bytes
    specials: Specials
    dtype: str
    vocab_size: int
    cut_documents: bool
    driver_mark: str = ""  # a file the driver keeps in `directory` while partitions run (see the module docstring)
    # cluster.storage_uri, for workers that do not see `directory`: they push their partitions to the store
    # (upload_partition; data_prep.dataset_store pulls them to the driver).
    store_uri: str = ""


class UnsharedDirectoryError(PipelineError, RuntimeError):
    """A worker's node does not see the driver's directory and there is no object store to send its work to."""


@dataclass
class PartitionRecord:
    index: int
    source: int
    shards: dict[str, list[ShardInfo]]
    documents_read: int
    documents: dict[str, int]
    tokens: dict[str, int]
    dropped_tail_tokens: dict[str, int]
    input_bytes: int
    decode: dict = field(default_factory=dict)  # DecodeReport fields
    doc_starts: dict[str, str] = field(default_factory=dict)  # split -> .npy file under parts/
    token_counts: str = ""  # .npy of the training split's count per token id, under parts/
    node: str = ""  # the Ray node that ran it (for the log; not in the manifest)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, index: int | None = None) -> PartitionRecord:
        """The record, after checking that every file it names is one a worker writes for its partition (`index`,
        when given, the partition it must be): a record comes back from a worker, or from the object store on a
        resume, and its names become paths. ValueError naming the first name that is not."""
        raw = json.loads(text)
        raw["shards"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["shards"].items()}
        record = cls(**raw)
        record.check_names(record.index if index is None else index)
        return record

    def check_names(self, index: int) -> None:
        stem = f"p{index:06d}"
        expected = {f"{stem}-{split}-doc_starts.npy" for split in SPLITS} | {f"{stem}-train-token_counts.npy", ""}
        problems = [f"index {self.index!r}"] if self.index != index else []
        problems += [f"split {split!r}" for split in self.shards if split not in SPLITS]
        problems += [repr(info.file) for split, infos in self.shards.items() for info in infos
                     if not re.fullmatch(rf"{re.escape(shard_prefix(split, index))}-[0-9]{{3,}}\.bin", str(info.file))]
        problems += [repr(name) for name in (*self.doc_starts.values(), self.token_counts) if name not in expected]
        if problems:
            raise ValueError(f"the record of partition {index} names {problems[0]}, which no worker writes for it: the "
                             f"record is damaged or crafted")


class _Counter:
    read = 0


def partition_documents(part: Partition, ctx: ReadContext, report: DecodeReport,
                        counter: _Counter | None = None) -> Iterator[str]:
    """The partition's documents in order."""
    src, where = ctx.sources[part.source], ctx.wheres[part.source]
    for piece in part.pieces:
        for doc in piece_documents(src, piece, ctx.data, report, where):
            if counter is not None:
                counter.read += 1
            yield doc


def blocks_of(documents: Iterator[str], block_chars: int) -> Iterator[list[str]]:
    block, size = [], 0
    for doc in documents:
        block.append(doc)
        size += len(doc)
        if size >= block_chars:
            yield block
            block, size = [], 0
    if block:
        yield block


class SplitStream:
    """One split of one partition: windows to shards, document starts, token counts."""

    def __init__(self, ctx: PrepareContext, split: str, index: int):
        window = ctx.data.context_length + 1
        self.packer = WindowPacker(window, ctx.specials.eos_id, np.dtype(ctx.dtype))
        self.writer = ShardWriter(Path(ctx.directory), split, window, np.dtype(ctx.dtype),
                                  max(1, ctx.data.shard_tokens // window), prefix=shard_prefix(split, index))
        self.documents = self.tokens = 0
        self.starts: list[np.ndarray] = []
        self.counts = np.zeros(ctx.vocab_size, dtype=np.int64) if split == "train" else None

    def add(self, stream: np.ndarray, lengths: np.ndarray) -> None:
        self.starts.append(self.tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        self.documents += len(lengths)
        self.tokens += len(stream)
        if self.counts is not None:
            self.counts += np.bincount(stream, minlength=len(self.counts))[: len(self.counts)]
        self.writer.add(self.packer.push(stream))

    def doc_starts(self) -> np.ndarray:
        """Offsets in the split's kept windows where documents start (those past the dropped tail left out)."""
        starts = np.concatenate(self.starts) if self.starts else np.zeros(0, dtype=np.int64)
        return starts[starts < self.tokens - self.packer.dropped_tokens]


def encode_block(tokenizer: TextTokenizer, docs: list[str], cut: bool, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(stream, per-document lengths with prefix and EOS) of a block of documents; long ones encoded in pieces."""
    return encode_split_block(tokenizer, docs, np.zeros(len(docs), dtype=bool), cut, dtype)["train"]


def encode_split_block(tokenizer: TextTokenizer, docs: list[str], is_val: np.ndarray, cut: bool,
                       dtype: np.dtype) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, (stream, per-document lengths with prefix and EOS) of the block's documents of that split, in
    order. One tokenizer call for the whole block (it spreads a batch over its threads; a small validation batch
    alone would leave them idle), returning int32 arrays: no Python int per token, and the stream is filled by
    array copies (benchmarks/data_prep_memory.py: the whole prepare went from 0.81-0.95 of raw encode at 0.5 GiB
    to 0.92 with it, against raw encode returning arrays too). A document's prefix (tokenizer.specials: a BOS
    where the checkpoint's convention adds one) goes before its first piece."""
    segments = make_segments(docs, cut)
    ids = tokenizer.encode_batch(segments.texts)
    eos_id, prefix = tokenizer.specials.eos_id, np.asarray(tokenizer.specials.prefix, dtype=np.int32)
    if len(prefix):
        first = np.ones(len(segments), dtype=bool)
        first[1:] = segments.document[1:] != segments.document[:-1]
        ids = [np.concatenate([prefix, piece]) if starts else piece for piece, starts in zip(ids, first, strict=True)]
    out = {}
    for split, mine in (("train", ~is_val), ("validation", is_val)):
        keep = mine[segments.document]
        owners = segments.document[keep]
        stream, piece_lengths = join_with_eos([ids[i] for i in np.flatnonzero(keep)], eos_id, dtype,
                                              segments.ends_document[keep])
        per_doc = np.bincount(owners, weights=piece_lengths, minlength=len(docs)).astype(np.int64)
        out[split] = (stream, per_doc[mine])
    return out


def _ray_node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside Ray (tests, tools): no node to name
        return ""


def save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())


def process_partition(part: Partition, ctx: PrepareContext, tokenizer: TextTokenizer) -> PartitionRecord:
    """Tokenize, pack and write one partition (see the module docstring); returns its record, written last."""
    directory = Path(ctx.directory)
    sees_driver = sees_driver_directory(ctx)
    (directory / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    report, counter = DecodeReport(), _Counter()
    streams = {split: SplitStream(ctx, split, part.index) for split in SPLITS}
    dtype = np.dtype(ctx.dtype)
    for block in blocks_of(partition_documents(part, ctx, report, counter), ctx.data.block_bytes):
        flags = np.array([is_validation(doc, ctx.data.val_fraction) for doc in block], dtype=bool)
        for split, (stream, lengths) in encode_split_block(tokenizer, block, flags, ctx.cut_documents, dtype).items():
            if len(lengths):
                streams[split].add(stream, lengths)
    record = PartitionRecord(
        index=part.index, source=part.source,
        shards={split: s.writer.close() for split, s in streams.items()},
        documents_read=counter.read,
        documents={split: s.documents for split, s in streams.items()},
        tokens={split: s.tokens for split, s in streams.items()},
        dropped_tail_tokens={split: s.packer.dropped_tokens for split, s in streams.items()},
        input_bytes=part.size, decode=asdict(report), node=_ray_node(),
    )
    stem = f"p{part.index:06d}"
    if ctx.data.keep_doc_boundaries:
        for split, s in streams.items():
            record.doc_starts[split] = f"{stem}-{split}-doc_starts.npy"
            save_npy(directory / PARTS_DIR / record.doc_starts[split], s.doc_starts())
    record.token_counts = f"{stem}-train-token_counts.npy"
    save_npy(directory / PARTS_DIR / record.token_counts, streams["train"].counts)
    write_atomic(record_path(directory, part.index), record.to_json())
    if not sees_driver:
        upload_partition(ctx, record)
    return record


def sees_driver_directory(ctx: PrepareContext) -> bool:
    """Whether this worker's node sees the driver's directory; an UnsharedDirectoryError when it does not and
    no object store is configured."""
    if not ctx.driver_mark:
        return True
    for attempt in range(5):  # a network file system may show a new file to other nodes a little late
        if (Path(ctx.directory) / ctx.driver_mark).exists():
            return True
        time.sleep(attempt * 0.5)
    if not ctx.store_uri:
        raise UnsharedDirectoryError(
            f"the Ray node {_ray_node() or '(unknown)'} does not see {ctx.directory}, where prepare writes the "
            f"shards: put output_dir on storage that every node mounts at the same path, set cluster.storage_uri "
            f"(the workers then upload their shards to it), or run prepare on one node (cluster=local)")
    return False


def partition_files(record: PartitionRecord) -> list[str]:
    """The partition's files, relative to the data set directory: shards, then parts, the record last."""
    shards = [info.file for infos in record.shards.values() for info in infos]
    parts = [f"{PARTS_DIR}/{name}" for name in (*record.doc_starts.values(), record.token_counts) if name]
    return [*shards, *parts, f"{PARTS_DIR}/{record_path(Path(), record.index).name}"]


def staged_as(directory: Path, name: str) -> Path:
    """Where a file of a partition (named relative to the partial `directory`) is kept in the object store, as the
    local path that maps there: shards where the finished data set goes, records and their parts in the partial
    directory's place until the manifest is written."""
    return (directory if name.startswith(f"{PARTS_DIR}/") else finished_dir(directory)) / name


def upload_partition(ctx: PrepareContext, record: PartitionRecord) -> None:
    """Send a partition written on a node that does not see the driver's directory to the object store (its
    shards to the finished data set's place, the rest to the partial directory's, the record last), then delete
    the local copy: that node's copy of the path is nobody's data set."""
    from pipeline.cluster.storage import Mirror

    directory = Path(ctx.directory)
    mirror = Mirror(ctx.store_uri, data_root=directory.parent)
    for name in partition_files(record):
        mirror.push_file(directory / name, as_path=staged_as(directory, name))
    for name in partition_files(record):
        (directory / name).unlink(missing_ok=True)
