"""A data set's tokenizer, set up on the driver before any partition is tokenized, in the partial directory.

    reused      the one an interrupted run of this partitioning made (its sha256 in the partial directory's state)
    the checkpoint's  data.tokenizer.hf: its directory's tokenizer.json (or tokenizer.model) and conventions
                (data_prep.hf_tokenizer)
    copied      data.tokenizer.model_path
    trained     on a bounded, seeded sample drawn on the workers: each sampled partition (whole partitions in a
                seeded order, up to data.tokenizer.sample_bytes) returns its data.tokenizer.sample_sentences
                training sentences of smallest seeded hash, and the driver keeps the smallest of all: the same
                sample whatever the partitioning of the work (SentencePiece's own sampling, which ignores the
                seed, is off)

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
from data_prep.partition_work import ReadContext, bottom_k, partition_documents
from data_prep.partitions import Partition
from data_prep.shards import TOKENIZER_FILE, sha256_file
from data_prep.text_tokenizer import TextTokenizer, open_tokenizer
from data_prep.tokenizer import check_round_trip, copy_tokenizer, train_tokenizer_on_sample
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
        t0 = time.time()
        sample = _draw_sample(partitions, ctx, data, workers)
        log.info("drew a tokenizer sample of %d sentences from %d partitions in %.1fs", len(sample),
                 len(_sample_partitions(partitions, data)), time.time() - t0)
        t0 = time.time()
        train_tokenizer_on_sample((s for _, s in sample), tok, path, data.seed)
        log.info("trained a %s tokenizer of %d pieces in %.1fs", tok.type, tok.vocab_size, time.time() - t0)
        source = "trained on a sample of the training split"
    tokenizer = open_tokenizer(path, specials)
    check_round_trip(tokenizer, _round_trip_texts(partitions, ctx), source)
    if state.get("tokenizer_sha256") != sha256_file(path):
        state["tokenizer_sha256"] = sha256_file(path)
        write_atomic(Path(directory) / STATE, json.dumps(state))
    return tokenizer


def _sample_partitions(partitions: list[Partition], data: DataConfig) -> list[Partition]:
    """Whole partitions in a seeded order until they hold data.tokenizer.sample_bytes of input."""
    key = lambda p: hashlib.sha256(f"{data.seed}:{p.index}".encode()).digest()  # noqa: E731
    chosen, size = [], 0
    for part in sorted(partitions, key=key):
        if size >= data.tokenizer.sample_bytes and chosen:
            break
        chosen.append(part)
        size += max(part.size, 1)
    return sorted(chosen, key=lambda p: p.index)


def _draw_sample(partitions: list[Partition], ctx: ReadContext, data: DataConfig, workers: int) -> list[tuple[int, str]]:
    """The bottom-k training sentences by seeded hash over the sampled partitions."""
    k = data.tokenizer.sample_sentences
    samples = run_actors(ctx, _sample_partitions(partitions, data), workers, "sample", k)
    sample = bottom_k((pair for _, part_sample in samples for pair in part_sample), k)
    if not sample:
        raise SourceError("the corpus holds no text to train the tokenizer on (its training split is empty, or "
                          "every input was empty or skipped as binary): point data.path at files with text in them")
    return sample


def _round_trip_texts(partitions: list[Partition], ctx: ReadContext) -> list[str]:
    docs = islice(partition_documents(partitions[0], ctx, DecodeReport()), _ROUND_TRIP_SAMPLE) if partitions else []
    return [d[:_ROUND_TRIP_CHARS] for d in docs]
