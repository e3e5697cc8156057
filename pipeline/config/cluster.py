"""cluster.* and tracking.*: where Ray runs and how workers are placed on its nodes; MLflow tracking."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.base import Choice, ConfigError, choice, non_negative, positive
from pipeline.config.parallel import ParallelConfig


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    # Tracking URI; null uses a SQLite store under output_dir.
    uri: str | None = None
    experiment: str = "pipeline"
    # MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, GPU
    # utilisation and memory where pynvml sees GPUs, ...) of rank 0's node, and as system/node<k>/... of every other
    # node of the run, averaged over this many seconds and logged at the training step reached; 0 turns them off.
    system_metrics_interval_s: float = 10.0


class PlacementStrategy(Choice):
    """Ray's placement group strategies."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass
class ClusterConfig:
    """Where Ray runs."""

    # local (Ray started in-process) | ray | slurm | kubernetes
    name: str = "local"
    # Where Ray is: null starts Ray in this process; "auto" joins the cluster this process runs on (inside a
    # Ray job or a Slurm allocation); host:port joins a running cluster. `pipeline submit` takes the
    # cluster's Jobs API URL here instead (http://HOST:8265).
    address: str | None = None
    # CPUs the in-process Ray may use; null uses every core of the machine.
    num_cpus: int | None = None
    # How training workers are placed on nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD.
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    # Exactly this many training workers on each node (null: as the placement strategy puts them): the
    # workers fill num_workers / workers_per_node nodes of the cluster, chosen among those with room.
    workers_per_node: int | None = None
    # After a worker group failed (train.max_failures), how long its relaunch waits for enough live nodes with
    # room (a node lost: the replacement joining the cluster) before the run fails.
    rejoin_timeout_s: float = 600.0
    # Seconds `pipeline submit` waits to reach the cluster before giving up.
    connect_timeout_s: float = 10.0
    # What `pipeline submit` uploads as the job's working directory: "auto" is this source tree (without
    # .venv, outputs, .git); a path uploads that directory; null uploads nothing (the image has the project).
    runtime_env_working_dir: str | None = "auto"
    # Absolute mount point of the storage every node of the cluster shares (e.g. /shared). When set,
    # `pipeline submit` requires output_dir below it and trusts it even if this machine does not mount it.
    shared_storage: str | None = None
    # An object store that keeps the data sets and checkpoints for nodes that share no file system
    # (s3://bucket/prefix, gs://..., hdfs://..., file:///...; pipeline.cluster.storage): output_dir is then a
    # working directory on each node, and `pipeline submit` checks that the store is writable.
    storage_uri: str | None = None
    # With storage_uri: a checkpoint's files go to the store in the background while training goes on (its
    # marker last, once every node's files are there); false uploads inside the save, which then waits.
    background_uploads: bool = True
    # With storage_uri: the complete checkpoints each node keeps on its own disk (0: as many as the store, i.e.
    # train.keep_last_checkpoints); the store keeps train.keep_last_checkpoints. 1 bounds a node's disk to one.
    local_checkpoints: int = 0


def validate_cluster(cluster: ClusterConfig) -> None:
    choice("cluster.placement_strategy", cluster.placement_strategy, PlacementStrategy)
    for key in ("workers_per_node", "num_cpus"):
        if getattr(cluster, key) is not None:
            positive(f"cluster.{key}", getattr(cluster, key))
    positive("cluster.connect_timeout_s", cluster.connect_timeout_s)
    non_negative("cluster.rejoin_timeout_s", cluster.rejoin_timeout_s, "0 relaunches only on the nodes there")
    non_negative("cluster.local_checkpoints", cluster.local_checkpoints, "0 keeps as many as the store")


def validate_tracking(tracking: TrackingConfig) -> None:
    non_negative("tracking.system_metrics_interval_s", tracking.system_metrics_interval_s, "0 turns them off")


def validate_placement(cluster: ClusterConfig, parallel: ParallelConfig) -> None:
    per_node = cluster.workers_per_node
    if per_node is not None and parallel.num_workers % per_node:
        raise ConfigError(
            f"parallel.num_workers={parallel.num_workers} is not a multiple of cluster.workers_per_node={per_node}: "
            f"every node gets the same number of workers; use parallel.num_workers="
            f"{per_node * max(1, round(parallel.num_workers / per_node))} or another workers_per_node."
        )
