"""Starting or joining Ray: in-process on a laptop, or a running cluster by address."""

from __future__ import annotations

import logging
import os

from pipeline.config import ClusterConfig

log = logging.getLogger(__name__)


def ensure_ray(cluster: ClusterConfig) -> None:
    """Initialise Ray once per process: join cluster.address, else start Ray inside this process."""
    import ray

    if ray.is_initialized():
        return
    # Keep Ray quiet and local: no dashboard, no usage reporting, no metrics exporter on a laptop.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cluster.address:
        if cluster.address.startswith(("http://", "https://")):
            raise ValueError(
                f"cluster.address={cluster.address} is a Jobs API URL: send the stage there with `pipeline submit`, "
                f"or give a Ray address (auto, or HOST:6379) to run this process as a driver of the cluster."
            )
        log.info("joining the Ray cluster at %s", cluster.address)
        ray.init(address=cluster.address, log_to_driver=True)
        return
    # Stops the Ray processes that would outlive this one if it were killed (see pipeline.cluster.reaper).
    from pipeline.cluster.reaper import start

    start()
    ray.init(
        num_cpus=cluster.num_cpus or os.cpu_count(),
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls.
        include_dashboard=True,
        dashboard_port=None,
        log_to_driver=True,
        configure_logging=False,
    )
