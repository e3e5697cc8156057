"""The Ray side of prepare: partitions handed to workers, small results back, as they finish.

Two engines run the same PartitionWorker (data.tokenize_engine):

    ray_data  Ray Data over the list of partition indices: map_batches with an ActorPoolStrategy of `workers`
              actors (one CPU each) scheduled over the cluster's nodes, with Ray Data's backpressure and retries.
              Only indices go in and records (a few hundred bytes each) come out: the text never passes
              through the driver or the object store. About 4 s longer to start on 2 cores.
    actors    a pool of plain Ray actors fed by the driver, one partition in flight per actor (plus one queued).

The results arrive in any order; the driver orders them by partition index, so the bytes do not depend on the
engine, the number of workers or of nodes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict

from data_prep.partition_work import (
    PartitionRecord,
    PrepareContext,
    ReadContext,
    process_partition,
)
from data_prep.partitions import Partition
from data_prep.tokenizer_sample import SentenceSample, sample_sentences
from pipeline.config import PipelineError
from pipeline.files import NoSpaceError

log = logging.getLogger(__name__)


class PartitionWorker:
    """Holds the context and the tokenizer (none with a ReadContext: it only samples); runs one partition per
    call."""

    def __init__(self, ctx: ReadContext, partitions: list[Partition]):
        self.ctx, self.partitions, self.tokenizer = ctx, {p.index: p for p in partitions}, None
        if isinstance(ctx, PrepareContext):
            from data_prep.text_tokenizer import tokenizer_from_bytes

            # One CPU per actor: a `tokenizers` batch encodes on this thread, not on a pool as wide as the machine.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

            self.tokenizer = tokenizer_from_bytes(ctx.tokenizer_file, ctx.tokenizer_bytes, ctx.specials)

    def process(self, index: int) -> dict:
        return asdict(process_partition(self.partitions[index], self.ctx, self.tokenizer))

    def sample(self, index: int, k: int, fraction: float, limit: int) -> SentenceSample:
        """The partition's sample from the start of it that holds `fraction` of its input bytes, as characters of
        text (a compressed file's text is read for fewer of its bytes); all of it at a fraction of 1 or where the
        size is not known (a streamed source)."""
        part = self.partitions[index]
        whole = fraction >= 1.0 or part.size <= 0
        return sample_sentences(part, self.ctx, k, None if whole else math.ceil(fraction * part.size), limit)


class _ArrowPartitionWorker(PartitionWorker):
    """PartitionWorker for Ray Data's map_batches: partition indices in, JSON records out."""

    def __call__(self, batch):
        import pyarrow as pa

        records = [json.dumps(self.process(int(i))) for i in batch.column("index").to_pylist()]
        return pa.table({"record": pa.array(records, pa.large_string())})


def unwrap(err: BaseException) -> BaseException:
    """The pipeline's own error (e.g. a SourceError naming the file) inside Ray's wrappers, else err."""
    found, seen, visited = None, err, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, (PipelineError, NoSpaceError)):
            found = seen  # the innermost: Ray's wrapper subclasses it and its message carries the remote traceback
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) and cause is not seen else seen.__cause__
    return found if found is not None else err


def run_actors(ctx: ReadContext, partitions: list[Partition], workers: int, op: str,
               args: Callable[[], tuple] = tuple) -> Iterator:
    """(partition, result) for every partition, as they finish, on `workers` plain actors: the actors' method `op`
    called with the partition's index and `args()`, asked for as the call is made."""
    import ray

    actor_class = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(PartitionWorker)
    actors = [actor_class.remote(ctx, partitions) for _ in range(min(workers, len(partitions)))]
    try:
        pending = list(reversed(partitions))
        in_flight: dict = {}
        idle = [a for a in actors for _ in range(2)]  # two calls queued per actor: none idles between them
        while pending or in_flight:
            while pending and idle:
                actor, part = idle.pop(), pending.pop()
                ref = getattr(actor, op).remote(part.index, *args())
                in_flight[ref] = (actor, part)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor, part = in_flight.pop(done[0])
            idle.append(actor)
            try:
                result = ray.get(done[0])
            except Exception as err:
                _drain(in_flight)
                raise unwrap(err) from err
            yield part, result
    finally:
        for actor in actors:
            ray.kill(actor)


def _drain(in_flight: dict, timeout_s: float = 600.0) -> None:
    """After a partition failed: drop the calls still queued and let the running ones end, so that killing the
    actors does not stop one half-way through writing a file (each call writes whole files, or removes its own
    temporary file when its write fails, as on a full device). Their finished partitions are kept for a resume."""
    import ray

    if not in_flight:
        return
    refs = list(in_flight)
    for ref in refs:
        ray.cancel(ref)  # a queued actor call is dropped; a running one goes on to its end
    log.info("a partition failed: waiting for the %d partition calls in flight to end before stopping", len(refs))
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)


def run_ray_data(ctx: PrepareContext, partitions: list[Partition], workers: int) -> Iterator:
    """(partition, record dict) for every partition through Ray Data (see the module docstring)."""
    import ray

    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    by_index = {p.index: p for p in partitions}
    ds = ray.data.from_items([{"index": p.index} for p in partitions], override_num_blocks=len(partitions))
    ds = ds.map_batches(_ArrowPartitionWorker, fn_constructor_kwargs={"ctx": ctx, "partitions": partitions},
                        compute=ray.data.ActorPoolStrategy(size=min(workers, len(partitions))),
                        batch_size=1, batch_format="pyarrow", num_cpus=1)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            for text in batch.column("record").to_pylist():
                record = json.loads(text)
                yield by_index[record["index"]], record
    except Exception as err:
        raise unwrap(err) from err


def run_partitions(ctx: PrepareContext, partitions: list[Partition], workers: int,
                   engine: str) -> Iterator[tuple[Partition, PartitionRecord]]:
    """Tokenize and write every partition; (partition, its record) as each finishes."""
    if not partitions:
        return
    runs = run_ray_data(ctx, partitions, workers) if engine == "ray_data" else run_actors(ctx, partitions, workers,
                                                                                           "process")
    for part, record in runs:
        yield part, PartitionRecord.from_json(json.dumps(record))
