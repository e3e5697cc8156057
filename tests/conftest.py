"""The suite runs in two test processes (pytest-xdist, `make test`), a file to one process at a time
(`--dist loadfile`: a module's fixtures, such as the two-node Ray cluster, start once). The files that take
longest go first, so that the two processes end together instead of one running the scaling loop alone at the
end; the order below is by the time each file took on a 2-core machine (minutes, serially), slowest first.
Files not named keep their order after these."""

from __future__ import annotations

SLOWEST_FIRST = [
    "tests/faults/test_kill.py",  # ~5.0
    "tests/cluster/test_multinode.py",  # ~4.5
    "tests/pipeline/scaling/test_loop.py",  # ~4.0
    "tests/pipeline/test_checkpointing.py",  # ~3.5
    "tests/test_end_to_end.py",  # ~3.0
    "tests/faults/test_disk_full.py",  # ~3.0
    "tests/test_preemption.py",  # ~2.8
    "tests/pipeline/test_training_equivalence.py",  # ~2.5
    "tests/pipeline/scaling/test_sweep.py",  # ~2.2
    "tests/pipeline/test_model_options_training.py",  # ~2.0
    "tests/pipeline/test_storage.py",  # ~1.8
    "tests/test_mixture_training.py",  # ~1.7
    "tests/faults/test_mlflow_outage.py",  # ~1.7
    "tests/data_prep/test_prepare.py",  # ~1.5
    "tests/data_prep/test_partitions.py",  # ~1.2
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    # A stable sort: tests keep their order within a file, and unnamed files theirs.
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOWEST_FIRST)))
