from __future__ import annotations

import os

import pytest
from corpora import make_corpus


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the data tests (Ray Data's tokenizer actors run on it)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def corpus_maker():
    """make_corpus, for tests that need corpora of their own."""
    return make_corpus
