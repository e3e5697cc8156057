"""The object store around a build, for Ray nodes that do not see the driver's directory (no shared file system).

Before any partition runs, the driver writes its mark into the partial directory and looks for it from every Ray
node (check_shared): a node that does not see it stops the run, naming the fix, unless cluster.storage_uri is
set. Then the workers on such nodes upload each partition they write (data_prep.partition_work.upload_partition:
shards under the finished data set's prefix, records and their parts under a staging prefix, the record last),
and the driver downloads them into its directory as they finish (fetch_partition), or, resuming a killed run,
those that were uploaded but never downloaded (fetch_staged). Once the data set is published, the staging
prefix is deleted (drop_staged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from data_prep.dataset_dirs import PARTIAL_SUFFIX
from data_prep.errors import DataPrepError
from data_prep.partition_work import PARTS_DIR, PartitionRecord, PrepareContext, partition_files, record_path
from data_prep.partitions import Partition
from data_prep.shards import shard_bytes
from pipeline.cluster.storage import ObjectStore, dataset_rel
from pipeline.files import write_atomic

log = logging.getLogger("data_prep.prepare")  # the stage's one log, whichever module writes the line


def staging_fields(store: ObjectStore | None, partial: Path) -> dict[str, str]:
    """PrepareContext's store fields for a build in the partial directory `partial`: the store, the finished
    data set's prefix in it and the staging prefix (none without a store)."""
    if store is None:
        return {}
    return {"store_uri": store.uri, "store_rel": dataset_rel(partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))),
            "staging_rel": dataset_rel(partial)}


def drop_staged(store: ObjectStore | None, partial: Path) -> None:
    """Delete the staged records of workers that uploaded theirs, once the data set is published."""
    if store is not None:
        store.delete_dir(dataset_rel(partial))


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


def fetch_staged(store: ObjectStore, ctx: PrepareContext, plan: list[Partition]) -> None:
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
            fetch_partition(store, ctx, record)
            fetched += 1
    if fetched:
        log.info("downloaded %d partitions that workers of the interrupted run uploaded to %s", fetched, store.uri)


def fetch_partition(store: ObjectStore, ctx: PrepareContext, record: PartitionRecord) -> None:
    """Download a partition that a worker uploaded (shards checked against their sha256 on the way), the record
    last, into the driver's directory."""
    digests = {info.file: info.sha256 for infos in record.shards.values() for info in infos}
    for name in partition_files(record):
        rel = ctx.staging_rel if name.startswith(f"{PARTS_DIR}/") else ctx.store_rel
        store.download_file(f"{rel}/{name}", Path(ctx.directory) / name, digests.get(name))
