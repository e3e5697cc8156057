"""Data sets in the object store (cluster.storage_uri), through the one mirror (pipeline.cluster.storage.Mirror;
every call a no-op without a store).

A finished data set is pushed once prepared (manifest last) and pulled by a node that lacks it, then checked
there against its sha256s (push_dataset, pull_dataset); a blend (data_prep.blend) travels as its recipe plus each
data set it names, every one under its own name.

During a build, for Ray nodes that do not see the driver's directory (no shared file system): before any
partition runs, the driver writes its mark into the partial directory and looks for it from every Ray node
(check_shared): a node that does not see it stops the run, naming the fix, unless the mirror is active. Then the
workers on such nodes push each partition they write (data_prep.partition_work.upload_partition: shards to the
finished data set's place in the store, records and their parts to the partial directory's, the record last),
and the driver pulls them into its directory as they finish (fetch_partition), or, resuming a killed run, those
that were pushed but never pulled (fetch_staged). Once the data set is published, the staging copy is deleted
(drop_staged).
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.blend import BLEND, blend_incomplete_reason, component_dirs, is_blend
from data_prep.errors import DataPrepError
from data_prep.partition_work import (
    PARTS_DIR,
    PartitionRecord,
    PrepareContext,
    partition_files,
    record_path,
    staged_as,
)
from data_prep.partitions import Partition
from data_prep.shards import (
    MANIFEST,
    ShardError,
    check_dataset_checksums,
    finished_dir,
    incomplete_reason,
    shard_bytes,
)
from pipeline.cluster.ray_runtime import nodes_not_seeing
from pipeline.cluster.storage import Mirror
from pipeline.files import write_atomic

log = logging.getLogger("data_prep.prepare")  # the stage's one log, whichever module writes the line


def pull_dataset(mirror: Mirror, dataset_dir: Path) -> bool:
    """Download the data set (or the blend and its data sets) from the store unless this node holds it
    complete, and check every file's sha256 against its manifest (ShardError names a file damaged on the
    way). True if anything was downloaded."""
    dataset_dir = Path(dataset_dir)
    if not mirror.active or (blend_incomplete_reason(dataset_dir) if is_blend(dataset_dir)
                             else incomplete_reason(dataset_dir)) is None:
        return False
    pulled = False
    if not is_blend(dataset_dir) and mirror.exists(dataset_dir / BLEND):
        pulled = _pull_one(mirror, dataset_dir, BLEND)
    if is_blend(dataset_dir):
        for component in component_dirs(dataset_dir):
            pulled = _pull_one(mirror, component, MANIFEST) or pulled
        reason = blend_incomplete_reason(dataset_dir)
        if reason is not None:
            raise ShardError(f"the blend {dataset_dir} is incomplete after downloading from {mirror.shown}: {reason}")
        return pulled
    return _pull_one(mirror, dataset_dir, MANIFEST)


def _pull_one(mirror: Mirror, directory: Path, marker: str) -> bool:
    present = (lambda: is_blend(directory)) if marker == BLEND else (lambda: incomplete_reason(directory) is None)
    if not mirror.pull(directory, marker, present=present):
        return False
    if marker == MANIFEST:
        check_dataset_checksums(directory)
    return True


def push_dataset(mirror: Mirror, dataset_dir: Path) -> int:
    """Upload a complete local data set (or a blend and its data sets) the store lacks, manifest last. Returns
    the files copied."""
    dataset_dir = Path(dataset_dir)
    if not mirror.active:
        return 0
    if is_blend(dataset_dir):
        copied = sum(_push_one(mirror, component, MANIFEST) for component in component_dirs(dataset_dir))
        return copied + _push_one(mirror, dataset_dir, BLEND)
    return _push_one(mirror, dataset_dir, MANIFEST)


def _push_one(mirror: Mirror, directory: Path, marker: str) -> int:
    if mirror.exists(Path(directory) / marker):
        return 0
    copied = mirror.push(Path(directory), marker=marker)
    log.info("uploaded the data set %s to %s (%d files)", directory.name, mirror.shown_path(directory), copied)
    return copied


def drop_staged(mirror: Mirror, partial: Path) -> None:
    """Delete the staged records of workers that uploaded theirs, once the data set is published."""
    mirror.delete(partial)


def check_shared(directory: Path, ctx: PrepareContext, mirror: Mirror) -> None:
    """Workers write their partitions' shards into `directory`. Writes the driver's mark there (the caller
    deletes it when the partitions are done) and looks for it from each Ray node: a node that does not see it
    stops the run before any work, naming the fix, unless there is an object store for its workers to upload to
    (data_prep.partition_work.upload_partition)."""
    write_atomic(Path(directory) / ctx.driver_mark, b"")
    blind = nodes_not_seeing(Path(directory) / ctx.driver_mark)
    if blind and not mirror.active:
        raise DataPrepError(
            f"the Ray nodes {', '.join(blind)} do not see {directory}: prepare's workers write the shards there, so "
            f"data.output_dir (output_dir) must be on storage that every node mounts at the same path (NFS, Lustre, "
            f"a shared volume), or set cluster.storage_uri (workers on such nodes then upload their shards to it), "
            f"or run prepare on one node (cluster=local)"
        )
    if blind:
        log.info("the Ray nodes %s do not see %s: their workers upload their partitions to %s, and this node "
                 "downloads them", ", ".join(blind), directory, mirror.shown_path(finished_dir(Path(directory))))


def fetch_staged(mirror: Mirror, ctx: PrepareContext, partitions: list[Partition]) -> None:
    """On a resume: partitions that workers of a killed run uploaded but this node never downloaded (a record in
    the staging prefix and every shard it lists in the store at its size) are downloaded, not done again."""
    if not mirror.active:
        return
    partial = Path(ctx.directory)
    staged = mirror.listing(partial / PARTS_DIR)
    if not staged:
        return
    uploaded = mirror.listing(finished_dir(partial))
    fetched = 0
    for part in partitions:
        local = record_path(partial, part.index)
        if local.is_file() or local.name not in staged:
            continue
        try:
            record = PartitionRecord.from_json(mirror.read_text(local), part.index)
        except (ValueError, TypeError, KeyError) as err:  # not a record a worker wrote: the partition is done again
            log.warning("ignoring the staged record %s in the store (%s): tokenizing partition %d again",
                        local.name, err, part.index)
            continue
        if all(uploaded.get(info.file) == shard_bytes(info, ctx.dtype) for infos in record.shards.values()
               for info in infos):
            fetch_partition(mirror, ctx, record)
            fetched += 1
    if fetched:
        log.info("downloaded %d partitions that workers of the interrupted run uploaded to %s", fetched, mirror.shown)


def fetch_partition(mirror: Mirror, ctx: PrepareContext, record: PartitionRecord) -> None:
    """Download a partition that a worker uploaded (shards checked against their sha256 on the way), the record
    last, into the driver's directory."""
    partial = Path(ctx.directory)
    digests = {info.file: info.sha256 for infos in record.shards.values() for info in infos}
    for name in partition_files(record):
        mirror.pull_file(partial / name, from_path=staged_as(partial, name), sha256=digests.get(name))
