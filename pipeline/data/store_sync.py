"""Prepared data sets kept in the object store (cluster.storage_uri; pipeline.cluster.storage): uploaded once
prepared (manifest last), downloaded by a node that lacks them and checked there against their sha256s."""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.shards import MANIFEST, check_dataset_checksums, incomplete_reason
from pipeline.cluster.storage import ObjectStore, dataset_rel, locked

log = logging.getLogger(__name__)


def pull_dataset(store: ObjectStore, dataset_dir: Path) -> bool:
    """Download the data set from the store unless this node holds it complete, and check every file's sha256
    against the manifest (ShardError names a file damaged on the way). True if downloaded."""
    dataset_dir = Path(dataset_dir)
    if incomplete_reason(dataset_dir) is None:
        return False
    with locked(dataset_dir):
        if incomplete_reason(dataset_dir) is None:  # another worker of this node fetched it meanwhile
            return False
        if not store.download_dir(dataset_rel(dataset_dir), dataset_dir, MANIFEST):
            return False
    check_dataset_checksums(dataset_dir)
    return True


def push_dataset(store: ObjectStore, dataset_dir: Path) -> int:
    """Upload a complete local data set the store lacks (manifest last). Returns the files copied."""
    if store.exists(f"{dataset_rel(dataset_dir)}/{MANIFEST}"):
        return 0
    copied = store.upload_dir(Path(dataset_dir), dataset_rel(dataset_dir), marker=MANIFEST)
    log.info("uploaded the data set %s to %s (%d files)", dataset_dir.name, store.path(dataset_rel(dataset_dir)), copied)
    return copied
