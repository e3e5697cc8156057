from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the data tests (Ray Data's tokenizer actors run on it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
