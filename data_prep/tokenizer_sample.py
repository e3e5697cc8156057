"""The tokenizer's training sample: a uniform sample of line *occurrences*, drawn on the workers in one read.

Every training-split sentence (line, data_prep.tokenizer.training_sentences) of a sampled partition gets a key
drawn from a generator seeded by (data.seed, the partition's index) alone, one key per occurrence in the order
the partition reads; the sample is the data.tokenizer.sample_sentences occurrences of smallest key (ties broken by
partition, then position). Keys are independent and uniform, so the sample is a uniform random sample without
replacement of the occurrences the sampled partitions hold: a line repeated a thousand times is in it about a
thousand times as often as a line that occurs once, never all-or-none. (The sample drawn before keyed each line by
the hash of its text, so every repeat of a line was in or out together: a sample of distinct lines with their
full multiplicity, a lumpier one. On a corpus with repeated lines its tokenizer needed a few % more tokens per
byte of held-out text; benchmarks/data_prep_memory.py measures both against a uniform sample.)

The keys depend on the partitioning (data.partition_bytes, which the shards depend on too) and never on the
number of workers or nodes or on which worker reads a partition, so neither does the sample or the tokenizer.

The work is one vectorised pass: a worker reads its partition, splits lines, draws all its keys at once and
returns its bottom k (numpy keys and positions beside the lines); the driver keeps a running bottom k, dropping
at once what lies above the k-th key it holds and telling the workers that key for the calls it makes next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_prep.decode_report import DecodeReport
from data_prep.partition_work import ReadContext, is_validation, partition_documents
from data_prep.partitions import Partition

# Mixed into the key generator's seed, so the keys are not the first draws of another use of data.seed.
_STREAM = 0x746F6B53  # "tokS"
_KEY_MAX = np.iinfo(np.uint64).max


def occurrence_keys(seed: int, partition: int, n: int) -> np.ndarray:
    """n uniform 64-bit keys for the sentences of partition `partition`, in reading order: a function of the
    seed and the partition's index alone."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & _KEY_MAX, _STREAM, partition])))
    return rng.integers(0, _KEY_MAX, size=n, dtype=np.uint64, endpoint=True)


def object_array(items: list) -> np.ndarray:
    """A 1-d array of Python objects (numpy indexes and concatenates it in C, where a list needs a Python loop)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


@dataclass
class SentenceSample:
    """Sentences (an object array of str) with their keys, partitions and positions (parallel arrays), in no
    particular order until `ordered`."""

    sentences: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    partitions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.sentences)

    def take(self, index: np.ndarray) -> SentenceSample:
        return SentenceSample(self.sentences[index], self.keys[index], self.partitions[index], self.positions[index])

    def ordered(self) -> np.ndarray:
        """Indices by (key, partition, position): the order a bottom k is taken in and trained in."""
        return np.lexsort((self.positions, self.partitions, self.keys))

    def bottom(self, k: int) -> SentenceSample:
        """The k of smallest (key, partition, position), in that order."""
        return self.take(self.ordered()[:k])

    def at_most(self, limit: int) -> np.ndarray:
        """Indices of the items whose key is at most `limit`."""
        return np.flatnonzero(self.keys <= limit)

    @staticmethod
    def concat(parts: list[SentenceSample]) -> SentenceSample:
        parts = [p for p in parts if len(p)] or [SentenceSample()]
        return SentenceSample(np.concatenate([p.sentences for p in parts]), np.concatenate([p.keys for p in parts]),
                              np.concatenate([p.partitions for p in parts]),
                              np.concatenate([p.positions for p in parts]))


def sample_sentences(part: Partition, ctx: ReadContext, k: int, chars: int | None,
                     limit: int = _KEY_MAX) -> SentenceSample:
    """The k training-split sentence occurrences of smallest key, of those with a key at most `limit`, among the
    partition's first documents: up to the one that reaches `chars` characters of text (all of them when the
    partition holds fewer; None: all)."""
    from data_prep.tokenizer import training_sentences

    docs, read = [], 0
    for doc in partition_documents(part, ctx, DecodeReport()):
        if not is_validation(doc, ctx.data.val_fraction):
            docs.append(doc)
        read += len(doc)
        if chars is not None and read >= chars:
            break
    sentences = list(training_sentences(docs))
    del docs
    n = len(sentences)
    sample = SentenceSample(object_array(sentences), occurrence_keys(ctx.data.seed, part.index, n),
                            np.full(n, part.index, np.int64), np.arange(n, dtype=np.int64))
    if limit < _KEY_MAX:
        sample = sample.take(sample.at_most(limit))
    return sample.bottom(k) if len(sample) > k else sample


class BottomK:
    """A running bottom k over partitions' samples, merged as they arrive in any order: the same k sentences,
    in the same order, whatever the order. `limit` is the k-th smallest key held so far (once k are held):
    nothing above it can be in the result, so it is dropped on arrival, and the workers are told it (a sample
    drawn later returns only what lies at or below it). Holds fewer than about 3k sentences (up to 2k held and one
    partition's k arriving); the first calls, made before any limit is known, may each return k."""

    def __init__(self, k: int):
        self.k, self.limit = k, _KEY_MAX
        self.held: list[SentenceSample] = []
        self.count = 0

    def add(self, sample: SentenceSample) -> None:
        sample = sample.take(sample.at_most(self.limit))
        if not len(sample):
            return
        self.held.append(sample)
        self.count += len(sample)
        if self.count > self.k:
            keys = np.concatenate([held.keys for held in self.held])
            self.limit = int(np.partition(keys, self.k - 1)[self.k - 1])
        if self.count >= 2 * self.k:
            merged = SentenceSample.concat(self.held)
            merged = merged.take(merged.at_most(self.limit))  # ties at the edge kept: the result decides them
            self.held, self.count = [merged], len(merged)

    def result(self) -> SentenceSample:
        return SentenceSample.concat(self.held).bottom(self.k)
