"""The prepare stage's entry: corpus -> partitions -> tokenizer -> per-partition shards on the workers -> manifest.

Outputs land in a directory named by a fingerprint of the data config and of its input files (data_prep.
dataset_dirs), so a changed config or corpus never writes over an old data set. The directory is built as
`<name>-<fingerprint>.partial/` under a lock and renamed when complete; a re-run with the same config finds it
finished and skips the work.

The driver only plans and merges; no process ever holds the corpus:

    partition  data_prep.partitions: file names and sizes cut into partitions of data.partition_bytes (the
               same partitions whatever the number of workers or nodes)
    tokenizer  data_prep.tokenizer_setup: data.tokenizer.model_path, or trained on a bounded, seeded sample drawn
               on the workers (the same sample whatever the partitioning of the work)
    shards     data_prep.partition_work on the workers (Ray Data or Ray actors: data_prep.workers): each
               partition read, split by hash, tokenized, packed and written as its own shards, then its record;
               nodes without the shared directory send theirs through the object store (data_prep.dataset_store)
    manifest   data_prep.merge: the records in partition order: shards, statistics per split and per source,
               document starts and the training split's token counts (the unigram baseline)

data_prep.build runs these steps for one data set. Killed at any point (kill -9 included), the same command
resumes: partitions with a record are kept, shards without one are deleted and their partitions done again
(data_prep.partial), and the bytes are those of an uninterrupted run.

A mixture (data.source=mixture) is prepared source by source with one tokenizer, each source as its own data set,
then blended by weight (data_prep.prepare_mixture).

Memory: a worker holds one block of text (data.block_bytes) and its tokens at a time, plus one shard being
written; the driver holds the partitioning (a few hundred bytes per partition), the tokenizer sample (at most
sample_sentences lines) and one partition record at a time. None of it grows with the corpus but the partitioning.

Callers (pipeline.stages, pipeline.launch, the benchmarks) import prepare, dataset_dir, is_complete and
DataPrepError from here.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.build import ProgressSink, prepare_source
from data_prep.dataset_dirs import dataset_dir, is_complete
from data_prep.errors import DataPrepError
from data_prep.prepare_mixture import prepare_mixture
from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.config import DataConfig

__all__ = ["DataPrepError", "ProgressSink", "dataset_dir", "is_complete", "prepare"]


def prepare(data: DataConfig, sink: ProgressSink | None = None, label: str = "", mirror: Mirror = NO_MIRROR) -> Path:
    """Prepare the data set of this config (or find it prepared) and return its directory. `sink` receives the
    progress (bytes read, documents, tokens, tokens/s, time left) every few seconds and the totals at the end;
    `label` names the data set in it ("" for a single one, the source's name within a mixture). `mirror`
    (cluster.storage_uri; pipeline.cluster.storage.Mirror): where workers on nodes that do not see output_dir send
    their partitions."""
    if data.source == "mixture":
        return prepare_mixture(data, sink, mirror)
    return prepare_source(data, sink, label, mirror)
