"""Parallel tokenization: the corpus cut into blocks, encoded by a pool of Ray actors, returned in order.

Documents longer than _SEGMENT_CHARS are cut into pieces before a space that follows a non-space. No piece
of a SentencePiece model trained here spans such a point (its pieces never hold a space after another
character), so for BPE the pieces' tokens are exactly the whole document's; the EOS follows only the last
piece. A 50 MB single-line document is thus spread over every actor in bounded memory, and encoded faster
than whole (SentencePiece slows down on very long inputs). Where no such space lies within half a piece
(text without spaces), the cut falls at the piece length; the result is still deterministic. Models that
add a dummy prefix or treat whitespace as a suffix are never cut.

Two engines drive the same actor class (data.tokenize_engine): Ray Data's map_batches over an
ActorPoolStrategy (streaming execution with backpressure and retries, the engine for large corpora and
many nodes), and a plain pool of Ray actors fed by the driver with a few blocks in flight each. Once
running both encode at the same speed, but Ray Data costs a fixed 3.5-4.5 s more to start on 2 cores
(its executor, its helper actors and fresh worker processes importing ray.data: the first block comes back
4-6 s after the start against about 1.3 s with plain actors; measured 29.3 s against 24.8 s for 200 MB of
text with 2 workers, 60.6 s against 52.0 s for 403 MB, benchmarks/data_prep_throughput.py). So `auto` picks Ray Data from
RAY_DATA_MIN_CHARS_PER_WORKER characters per tokenizer actor on (about 35 s of encoding per actor), where
that start is about a tenth of the run or less, and plain actors below.
Each actor turns its block into one flat token stream per split (pieces followed by EOS where a document
ends), so the driver receives a few bytes per token and only cuts windows and writes shards. Blocks come back
in corpus order with either engine, which makes the output byte-identical whatever the engine or the number
of workers.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.packing import join_with_eos
from data_prep.shards import SPLITS

log = logging.getLogger(__name__)

# Characters of text per block sent to a tokenizer actor: large enough to amortise the per-call cost,
# small enough that every actor gets several blocks (and the last ones leave little idle time).
_MIN_BLOCK_CHARS, _MAX_BLOCK_CHARS = 1 << 16, 1 << 22
# Documents longer than this are encoded in pieces of about this many characters. SentencePiece encodes
# long inputs more slowly per token (0.4 M tokens/s for 1 M characters, 1.1 M for 16 k, on one core here).
_SEGMENT_CHARS = 1 << 14
# An actor encodes its block in batches of about this many characters, to bound its memory.
_ENCODE_BATCH_CHARS = 1 << 21
# Blocks queued per actor: one being encoded, one waiting, so that no actor idles between blocks.
_BLOCKS_PER_ACTOR = 2
# data.tokenize_engine=auto uses Ray Data from this much text per tokenizer actor on (characters), plain
# actors below (see the module docstring).
RAY_DATA_MIN_CHARS_PER_WORKER = 160 << 20


def tokenize_engine(configured: str, total_chars: int, workers: int) -> str:
    """The engine that runs: the configured one, or for `auto` Ray Data from RAY_DATA_MIN_CHARS_PER_WORKER
    characters per actor on."""
    if configured != "auto":
        return configured
    return "ray_data" if total_chars >= RAY_DATA_MIN_CHARS_PER_WORKER * max(1, workers) else "actors"


@dataclass
class Segments:
    """The corpus as pieces to encode, in order: whole documents, and long ones cut into several pieces."""

    texts: list[str]
    # Index of the document each piece belongs to.
    document: np.ndarray
    # Whether the piece is its document's last (an EOS follows it).
    ends_document: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


def can_cut_documents(model_proto: bytes) -> bool:
    """Whether cutting before a space leaves a model's tokens unchanged: not with a dummy prefix (each piece
    would gain a leading space), nor with whitespace treated as a suffix, nor for a model trained without
    splitting at whitespace (its pieces may span a space)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    trainer = model.trainer_spec
    return (not model.normalizer_spec.add_dummy_prefix and not trainer.treat_whitespace_as_suffix
            and trainer.split_by_whitespace)


def cut_points(text: str, size: int) -> list[int]:
    """Offsets that cut text into pieces of at most `size` characters, each just before a space that follows
    a non-space where one lies in the second half of the piece."""
    cuts, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        while cut > start and text[cut - 1] == " ":  # to the start of a run of spaces
            cut -= 1
        if cut <= start:
            cut = start + size
        cuts.append(cut)
        start = cut
    return cuts


def make_segments(documents: list[str], cut: bool, segment_chars: int | None = None) -> Segments:
    """The documents as pieces to encode (see the module docstring)."""
    size = segment_chars or _SEGMENT_CHARS
    long = [i for i, doc in enumerate(documents) if len(doc) > size]
    if long and not cut:
        huge = sum(len(documents[i]) > 64 * size for i in long)
        if huge:
            log.warning("%d documents are longer than %d characters but the tokenizer adds a dummy prefix (or "
                        "treats whitespace as a suffix), so each is encoded whole by one actor: slower, and memory "
                        "grows with the document; a model trained here (no dummy prefix) avoids this", huge, 64 * size)
        long = []
    if not long:
        n = len(documents)
        return Segments(documents, np.arange(n, dtype=np.int64), np.ones(n, dtype=bool))
    texts, owner, ends = [], [], []
    for i, doc in enumerate(documents):
        bounds = [0, *cut_points(doc, size), len(doc)] if len(doc) > size else [0, len(doc)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            texts.append(doc[a:b])
            owner.append(i)
            ends.append(b == len(doc))
    log.info("%d documents longer than %d characters are encoded in %d pieces", len(long), size,
             len(texts) - len(documents) + len(long))
    return Segments(texts, np.array(owner, dtype=np.int64), np.array(ends, dtype=bool))


def make_blocks(segments: Segments, is_val: np.ndarray, workers: int, start: int = 0) -> list[dict]:
    """Consecutive runs of pieces from `start` on, of about the same number of characters, in order. Each
    block names its pieces' range [first, stop) and carries their texts, splits and document ends."""
    sizes = np.fromiter((len(t) for t in segments.texts[start:]), dtype=np.int64, count=len(segments) - start)
    target = int(min(_MAX_BLOCK_CHARS, max(_MIN_BLOCK_CHARS, sizes.sum() // (8 * workers))))
    blocks, first, size = [], start, 0
    for i, n in enumerate(sizes.tolist(), start):
        size += n
        if size >= target or i == len(segments) - 1:
            blocks.append({
                "block": len(blocks), "first": first, "stop": i + 1,
                "texts": segments.texts[first : i + 1],
                "is_val": is_val[first : i + 1].tolist(),
                "ends": segments.ends_document[first : i + 1].tolist(),
            })
            first, size = i + 1, 0
    return blocks


class TokenizeBlock:
    """A tokenizer actor (one CPU of the pool): encodes a block into one flat token stream per split (EOS
    after each document's last piece), so that little travels back to the driver."""

    def __init__(self, model_proto: bytes, dtype: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.load_from_serialized_proto(model_proto)
        self.eos_id = self.sp.eos_id()
        self.dtype = np.dtype(dtype)

    def __call__(self, block: dict) -> dict:
        """{"block": index, split: token stream, split_lengths: tokens per piece} for both splits."""
        out = {"block": block["block"]}
        for split in SPLITS:
            want_val = split == "validation"
            mine = [j for j, v in enumerate(block["is_val"]) if v == want_val]
            out[split], out[f"{split}_lengths"] = self.encode([block["texts"][j] for j in mine],
                                                              [block["ends"][j] for j in mine])
        return out

    def encode(self, texts: list[str], ends: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        """The pieces' tokens joined with EOS, encoded in batches of bounded size."""
        streams, lengths, first, size = [], [], 0, 0
        for i, text in enumerate(texts):
            size += len(text)
            if size >= _ENCODE_BATCH_CHARS or i == len(texts) - 1:
                # One thread per actor: the actor holds one CPU of the pool.
                ids = self.sp.encode(texts[first : i + 1], num_threads=1)
                stream, length = join_with_eos(ids, self.eos_id, self.dtype, ends[first : i + 1])
                streams.append(stream)
                lengths.append(length)
                first, size = i + 1, 0
        if not streams:
            return np.empty(0, dtype=self.dtype), np.empty(0, dtype=np.int64)
        return np.concatenate(streams), np.concatenate(lengths)


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


class TokenizerPool:
    """Ray actors that each hold the tokenizer (one CPU each). Created as early as the model is known, so
    that their start-up overlaps the reading of the corpus; `map` feeds them blocks and yields the results in
    block order, with up to _BLOCKS_PER_ACTOR blocks in flight per actor: the driver sends a block when one
    comes back, so the object store holds a few blocks at a time, never the whole corpus."""

    engine = "actors"

    def __init__(self, model_proto: bytes, dtype: np.dtype, workers: int):
        import ray

        actor_class = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(TokenizeBlock)
        self.workers = workers
        self.actors = [actor_class.remote(model_proto, np.dtype(dtype).str) for _ in range(workers)]

    def map(self, blocks: list[dict]) -> Iterator[dict]:
        """Each block's tokenized output (see TokenizeBlock.__call__), in block order."""
        import ray

        in_flight: deque[tuple[int, ray.ObjectRef]] = deque()
        load = [0] * len(self.actors)
        submitted = 0
        while submitted < len(blocks) or in_flight:
            while submitted < len(blocks) and len(in_flight) < _BLOCKS_PER_ACTOR * len(self.actors):
                actor = min(range(len(self.actors)), key=load.__getitem__)
                in_flight.append((actor, self.actors[actor].__call__.remote(blocks[submitted])))
                load[actor] += 1
                submitted += 1
            actor, ref = in_flight.popleft()
            row = ray.get(ref)
            load[actor] -= 1
            yield row

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ArrowTokenizeBlock(TokenizeBlock):
    """TokenizeBlock for Ray Data's map_batches: one Arrow row per block in, one row of bytes out."""

    def __call__(self, batch):  # type: ignore[override]
        import pyarrow as pa

        rows = [TokenizeBlock.__call__(self, {k: batch.column(k)[i].as_py() for k in batch.column_names})
                for i in range(batch.num_rows)]
        cols = {"block": pa.array([r["block"] for r in rows], pa.int64())}
        for split in SPLITS:
            for key in (split, f"{split}_lengths"):
                cols[key] = pa.array([r[key].tobytes() for r in rows], pa.large_binary())
        return pa.table(cols)


class RayDataTokenizerPool:
    """The same actors through Ray Data: map_batches over the blocks with an ActorPoolStrategy of `workers`
    actors, results in block order (preserve_order). Ray Data schedules the actors over the cluster's nodes,
    holds a bounded number of blocks in flight and restarts failed actors."""

    engine = "ray_data"

    def __init__(self, model_proto: bytes, dtype: np.dtype, workers: int):
        self.model_proto, self.dtype, self.workers = model_proto, np.dtype(dtype), workers

    def map(self, blocks: list[dict]) -> Iterator[dict]:
        """Each block's tokenized output (see TokenizeBlock.__call__), in block order."""
        import ray

        if not blocks:
            return

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(blocks, override_num_blocks=len(blocks)).map_batches(
            _ArrowTokenizeBlock, fn_constructor_kwargs={"model_proto": self.model_proto, "dtype": self.dtype.str},
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(blocks))),
            batch_size=1, batch_format="pyarrow", num_cpus=1,
        )
        expected = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            for i in range(batch.num_rows):
                expected += 1
                row = {"block": batch.column("block")[i].as_py()}
                for split in SPLITS:
                    row[split] = np.frombuffer(batch.column(split)[i].as_py(), dtype=self.dtype)
                    row[f"{split}_lengths"] = np.frombuffer(batch.column(f"{split}_lengths")[i].as_py(), np.int64)
                if row["block"] != expected - 1:  # the order is what makes the bytes independent of the run
                    raise RuntimeError(f"Ray Data returned block {row['block']} where block {expected - 1} was due")
                yield row
        if expected != len(blocks):
            raise RuntimeError(f"Ray Data returned {expected} of {len(blocks)} blocks")

    def close(self) -> None:
        """Nothing to release: Ray Data ends its actors when the iteration ends."""

    def __enter__(self) -> RayDataTokenizerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
