"""Starting or joining Ray: in-process on a laptop, or a running cluster by address.

Ray started here listens on loopback only (its GCS, raylet, workers, dashboard and agents): nothing on the network
reaches it, whatever Ray's token authentication does. A cluster is asked for with cluster.address.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

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
    with loopback_only():
        ray.init(
            num_cpus=cluster.num_cpus or os.cpu_count(),
            # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=None,
            log_to_driver=True,
            configure_logging=False,
        )


@contextmanager
def loopback_only():
    """While it lasts, the Ray that ray.init starts is a loopback-only one. Ray binds its gRPC servers (GCS, raylet,
    every worker) to 127.0.0.1 only when the node's address is 127.0.0.1, but on Linux ray.init turns a loopback
    _node_ip_address into the machine's outward address (services.resolve_ip_for_localhost); Ray's switch for
    single-machine Ray (the default on macOS and Windows) keeps loopback. The processes Ray starts inherit the
    variable (the constant is read when ray is imported, so it is set too); both are restored afterwards, so that
    this process can still join a cluster, and a `ray start` it runs is not refused."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
