"""Mirrors (pipeline.cluster.storage.Mirror) of one node's directories onto a test's object store."""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster.storage import Mirror, ObjectStore


def data_mirror(store: ObjectStore, dataset_dir: Path) -> Mirror:
    """The mirror of the data root that holds dataset_dir (its data sets map to data/<name>)."""
    return Mirror(store.uri, data_root=Path(dataset_dir).parent)


def run_mirror(store: ObjectStore, run_dir: Path) -> Mirror:
    """The mirror of the runs root that holds run_dir (its files map to runs/<run name>/...)."""
    return Mirror(store.uri, runs_root=Path(run_dir).parent)
