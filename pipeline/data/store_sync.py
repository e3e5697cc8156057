"""Prepared data sets kept in the object store (cluster.storage_uri; pipeline.cluster.storage): uploaded once
prepared (manifest last), downloaded by a node that lacks them and checked there against their sha256s. A
blend (data_prep.blend) travels as its recipe plus each data set it names, every one under its own name."""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.blend import BLEND, blend_incomplete_reason, component_dirs, is_blend
from data_prep.shards import MANIFEST, ShardError, check_dataset_checksums, incomplete_reason
from pipeline.cluster.storage import ObjectStore, dataset_rel, locked

log = logging.getLogger(__name__)


def pull_dataset(store: ObjectStore, dataset_dir: Path) -> bool:
    """Download the data set (or the blend and its data sets) from the store unless this node holds it
    complete, and check every file's sha256 against its manifest (ShardError names a file damaged on the
    way). True if anything was downloaded."""
    dataset_dir = Path(dataset_dir)
    if is_blend(dataset_dir) and blend_incomplete_reason(dataset_dir) is None:
        return False
    if not is_blend(dataset_dir) and incomplete_reason(dataset_dir) is None:
        return False
    pulled = False
    if not is_blend(dataset_dir) and store.exists(f"{dataset_rel(dataset_dir)}/{BLEND}"):
        pulled = _pull_one(store, dataset_dir, BLEND)
    if is_blend(dataset_dir):
        for component in component_dirs(dataset_dir):
            pulled = _pull_one(store, component, MANIFEST) or pulled
        reason = blend_incomplete_reason(dataset_dir)
        if reason is not None:
            raise ShardError(f"the blend {dataset_dir} is incomplete after downloading from {store.shown}: {reason}")
        return pulled
    return _pull_one(store, dataset_dir, MANIFEST)


def _pull_one(store: ObjectStore, directory: Path, marker: str) -> bool:
    done = (lambda: is_blend(directory)) if marker == BLEND else (lambda: incomplete_reason(directory) is None)
    if done():
        return False
    with locked(directory):
        if done():  # another worker of this node fetched it meanwhile
            return False
        if not store.download_dir(dataset_rel(directory), directory, marker):
            return False
    if marker == MANIFEST:
        check_dataset_checksums(directory)
    return True


def push_dataset(store: ObjectStore, dataset_dir: Path) -> int:
    """Upload a complete local data set (or a blend and its data sets) the store lacks, manifest last. Returns
    the files copied."""
    dataset_dir = Path(dataset_dir)
    copied = 0
    if is_blend(dataset_dir):
        for component in component_dirs(dataset_dir):
            copied += _push_one(store, component, MANIFEST)
        return copied + _push_one(store, dataset_dir, BLEND)
    return _push_one(store, dataset_dir, MANIFEST)


def _push_one(store: ObjectStore, directory: Path, marker: str) -> int:
    if store.exists(f"{dataset_rel(directory)}/{marker}"):
        return 0
    copied = store.upload_dir(Path(directory), dataset_rel(directory), marker=marker)
    log.info("uploaded the data set %s to %s (%d files)", directory.name, store.path(dataset_rel(directory)), copied)
    return copied
