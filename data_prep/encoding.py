"""Encoding long documents in pieces, and the choice of the prepare engine.

Documents longer than _SEGMENT_CHARS are cut into pieces before a space that follows a non-space. No piece
of a SentencePiece model trained here spans such a point (its pieces never hold a space after another
character), so for BPE the pieces' tokens are exactly the whole document's; the EOS follows only the last
piece. A 50 MB single-line document is thus encoded faster than whole (SentencePiece slows down on very long
inputs), by the one worker whose partition holds it (a document is never split over partitions). Where no such space lies within half a piece
(text without spaces), the cut falls at the piece length; the result is still deterministic. Models that
add a dummy prefix or treat whitespace as a suffix are never cut.

The engines that run partitions (data_prep.workers): Ray Data costs a fixed 3.5-4.5 s more to start on 2 cores
than plain Ray actors (measured 29.3 s against 24.8 s for 200 MB of text with 2 workers) and more memory: at 2 GiB
of input with 2 workers (benchmarks/data_prep_memory.py, 2026-12-07, the tokenizer trained) Ray Data peaked at
1.51 GiB of the machine's memory above idle against 1.12 GiB for plain actors, for the same speed within this
machine's run-to-run noise (0.891 and 0.878 of raw encode). So `auto` picks plain actors up to
RAY_DATA_MIN_CHARS_PER_WORKER bytes of input per worker (4 GiB) and Ray Data from there on (its backpressure and
retries for long runs); `data.tokenize_engine` forces either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Documents longer than this are encoded in pieces of about this many characters. SentencePiece encodes
# long inputs more slowly per token (0.4 M tokens/s for 1 M characters, 1.1 M for 16 k, on one core here).
_SEGMENT_CHARS = 1 << 14
# data.tokenize_engine=auto uses Ray Data from this much input per tokenizer actor on (bytes), plain actors
# below (see the module docstring).
RAY_DATA_MIN_CHARS_PER_WORKER = 4 << 30


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
