"""A data set's tokenizer, set up on the driver before any partition is tokenized, in the partial directory.

    reused      the one an interrupted run of this partitioning made (its sha256 in the partial directory's state)
    the checkpoint's  data.tokenizer.hf: its directory's tokenizer.json (or tokenizer.model) and conventions
                (data_prep.hf_tokenizer)
    copied      data.tokenizer.model_path
    trained     on a bounded, seeded, uniform sample of line occurrences drawn on the workers
                (data_prep.tokenizer_sample): up to SAMPLE_PLACES partitions in a seeded order are read from
                their start, the same fraction of each, data.tokenizer.sample_bytes of input in all; each returns
                its data.tokenizer.sample_sentences occurrences of smallest seeded key, and the driver keeps the
                smallest of all: the same sample whatever the number of workers (SentencePiece's own sampling,
                which ignores the seed, is off)

Whichever it is, it must give back the first documents of the corpus exactly (a round trip) before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from itertools import islice
from pathlib import Path

from data_prep.decode_report import DecodeReport
from data_prep.errors import SourceError
from data_prep.hf_tokenizer import HFTokenizerSource
from data_prep.partial import STATE
from data_prep.partition_work import ReadContext, partition_documents
from data_prep.partitions import Partition
from data_prep.shards import TOKENIZER_FILE, sha256_file
from data_prep.text_tokenizer import TextTokenizer, open_tokenizer
from data_prep.tokenizer import check_round_trip, copy_tokenizer, train_tokenizer_on_sample
from data_prep.tokenizer_sample import BottomK, SentenceSample
from data_prep.workers import run_actors
from pipeline.config import DataConfig
from pipeline.files import write_atomic

log = logging.getLogger("data_prep.prepare")  # the stage's one log, whichever module writes the line

# Documents of the first partition checked for a tokenizer round trip, and characters of each.
_ROUND_TRIP_SAMPLE, _ROUND_TRIP_CHARS = 64, 1 << 14


def make_tokenizer(partitions: list[Partition], ctx: ReadContext, directory: Path, state: dict,
                   workers: int) -> TextTokenizer:
    """The tokenizer of the data set being built in `directory` (see the module docstring), its sha256 recorded
    in the directory's state; loaded."""
    data = ctx.data
    tok = data.tokenizer
    hf = HFTokenizerSource(tok.hf) if tok.hf else None
    path = Path(directory) / (hf.file_name if hf else TOKENIZER_FILE)
    specials = hf.specials if hf else None
    if state.get("tokenizer_sha256") and path.is_file() and sha256_file(path) == state["tokenizer_sha256"]:
        log.info("reusing the tokenizer of the interrupted run in %s", directory)
        source = "of the interrupted run"
    elif hf:
        write_atomic(path, hf.data)
        source = f"data.tokenizer.hf={tok.hf}"
        log.info("tokenizing with %s's %s: EOS %d, BOS %d, each document starting with %s", tok.hf, hf.file_name,
                 specials.eos_id, specials.bos_id, list(specials.prefix) or "no special token")
    elif tok.model_path:
        copy_tokenizer(tok.model_path, path)
        source = tok.model_path
    else:
        sample = _draw_sample(partitions, ctx, data, workers)
        t0 = time.time()
        train_tokenizer_on_sample(sample.sentences.tolist(), tok, path, data.seed)
        del sample
        log.info("trained a %s tokenizer of %d pieces in %.1fs", tok.type, tok.vocab_size, time.time() - t0)
        source = "trained on a sample of the training split"
    tokenizer = open_tokenizer(path, specials)
    check_round_trip(tokenizer, _round_trip_texts(partitions, ctx), source)
    if state.get("tokenizer_sha256") != sha256_file(path):
        state["tokenizer_sha256"] = sha256_file(path)
        write_atomic(Path(directory) / STATE, json.dumps(state))
    return tokenizer


# The most partitions the tokenizer sample reads (in a seeded order; all of a corpus with fewer). Each is read from
# its start for the same fraction of its bytes, data.tokenizer.sample_bytes in all: a large corpus is sampled in
# this many places spread over it, each a few MiB or more, rather than in a few whole partitions.
SAMPLE_PLACES = 64


def _sample_partitions(partitions: list[Partition], data: DataConfig) -> tuple[list[Partition], float]:
    """The partitions the sample reads (SAMPLE_PLACES in a seeded order) and the fraction of each it reads."""
    key = lambda p: hashlib.sha256(f"{data.seed}:{p.index}".encode()).digest()  # noqa: E731
    chosen = sorted(sorted(partitions, key=key)[:SAMPLE_PLACES], key=lambda p: p.index)
    total = sum(max(p.size, 1) for p in chosen)
    return chosen, min(1.0, data.tokenizer.sample_bytes / max(total, 1))


def _draw_sample(partitions: list[Partition], ctx: ReadContext, data: DataConfig, workers: int) -> SentenceSample:
    """The sample_sentences occurrences of smallest key over the sampled partitions' first bytes, in key order."""
    t0, k = time.time(), data.tokenizer.sample_sentences
    chosen, fraction = _sample_partitions(partitions, data)
    bottom = BottomK(k)
    for _, part_sample in run_actors(ctx, chosen, workers, "sample", lambda: (k, fraction, bottom.limit)):
        bottom.add(part_sample)
    sample = bottom.result()
    if not len(sample):
        raise SourceError("the corpus holds no text to train the tokenizer on (its training split is empty, or "
                          "every input was empty or skipped as binary): point data.path at files with text in them")
    log.info("drew a tokenizer sample of %d line occurrences from the first %.0f%% of %d partitions (%.0f MB) in %.1fs",
             len(sample), 100 * fraction, len(chosen), fraction * sum(p.size for p in chosen) / 1e6, time.time() - t0)
    return sample


def _round_trip_texts(partitions: list[Partition], ctx: ReadContext) -> list[str]:
    docs = islice(partition_documents(partitions[0], ctx, DecodeReport()), _ROUND_TRIP_SAMPLE) if partitions else []
    return [d[:_ROUND_TRIP_CHARS] for d in docs]
