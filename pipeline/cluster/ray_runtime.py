"""Starting or joining Ray: in-process on a laptop, or a running cluster by address.

Ray started here listens on loopback only (its GCS, raylet, workers, dashboard and agents): nothing on the network
reaches it, whatever Ray's token authentication does. A cluster is asked for with cluster.address.
"""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import ClusterConfig, ConfigError
from pipeline.files import write_atomic
from pipeline.redaction import redact_uri

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


def nodes_not_seeing(path) -> list[str]:
    """The addresses of the live Ray nodes (those with CPUs) on which `path`, which exists here, does not exist:
    nodes that do not share this node's file system there. [] on one node, where nothing is asked."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0] if ray.is_initialized() else []
    if len(nodes) <= 1:
        return []
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sees = ray.remote(num_cpus=0)(lambda where: os.path.exists(where))
    seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(path)) for n in nodes])
    return [n["NodeManagerAddress"] for n, ok in zip(nodes, seen, strict=True) if not ok]


LOCAL_TRACKING_SCHEMES = ("sqlite", "file", "")


def check_nodes_share(directory, storage_uri: str | None, tracking_uri: str) -> list[str]:
    """Before a training run starts: the Ray nodes that do not see `directory` (the run directory, below
    output_dir), and a ConfigError naming them and the fix when such nodes lack what they need: any node may run
    a rank, so the checkpoints must go through cluster.storage_uri, and rank 0 (which logs to MLflow) through a
    tracking server rather than a store on this node's disk. Returns the nodes ([] when every node sees it)."""
    mark = Path(directory) / f".driver-{uuid.uuid4().hex[:12]}"
    write_atomic(mark, b"")
    try:
        blind = nodes_not_seeing(mark)
    finally:
        mark.unlink(missing_ok=True)
    if not blind:
        return []
    nodes = ", ".join(blind)
    if not storage_uri:
        raise ConfigError(
            f"the Ray nodes {nodes} do not see {directory}, where the run's checkpoints go: put output_dir on "
            f"storage every node mounts at the same path (NFS, Lustre, a shared volume), or set cluster.storage_uri "
            f"(s3://bucket/prefix, gs://..., file:///mounted/path): each node then keeps a working copy and the "
            f"checkpoints live in the store")
    scheme = tracking_uri.split("://", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme in LOCAL_TRACKING_SCHEMES:
        raise ConfigError(
            f"the Ray nodes {nodes} do not see {directory}, and MLflow's store is on this node's disk "
            f"(tracking.uri={redact_uri(tracking_uri)}): rank 0, which logs the run, may run on any node. Start an "
            f"MLflow server (mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination "
            f"s3://bucket/mlflow --host 127.0.0.1, behind your authentication) and set tracking.uri=http://HOST:5000")
    log.info("the Ray nodes %s do not see %s: checkpoints go through %s, MLflow through %s", nodes, directory,
             redact_uri(storage_uri), redact_uri(tracking_uri))
    return blind
