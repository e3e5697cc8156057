"""Training workers under Ray Train: one TorchTrainer worker per rank, each running train_worker; rank 0's
outcome comes back to the driver as the training function's return value (Ray Train's Result.return_value), so
no node needs a disk the driver reads."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from pathlib import Path

from pipeline.config import ConfigError, ParallelConfig
from pipeline.train.run_spec import RunLink, RunSpec, TrainOutcome

log = logging.getLogger(__name__)


def _ray_worker(config: dict) -> TrainOutcome:
    import ray
    import torch.distributed as dist

    from pipeline.redaction import install_log_filter, remember_secrets
    from pipeline.train.worker import train_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec: RunSpec = config["spec"]
    link: RunLink = config["link"]
    remember_secrets(link.tracking_uri, spec.storage_uri)  # what the worker logs reaches the driver's output
    install_log_filter()
    outcome = train_worker(spec, link)
    # Which Ray node each rank ran on, for the record (placement across nodes shows here).
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return dataclasses.replace(outcome, worker_nodes=nodes)  # rank 0's reaches the driver (Result.return_value)


def worker_resources(parallel: ParallelConfig) -> dict[str, float]:
    resources = {"CPU": float(parallel.cpus_per_worker)}
    if parallel.use_gpu:
        resources["GPU"] = float(parallel.gpus_per_worker)
    return resources


def workers_on_nodes(parallel: ParallelConfig, workers_per_node: int, wait_s: float = 0.0) -> list[dict[str, str]]:
    """One Ray label selector per worker that puts exactly workers_per_node of them on each of the first
    num_workers / workers_per_node live nodes with room for them (by node id, head first). With wait_s (a relaunch
    after losing a node) it waits that long for enough nodes, such as a replacement joining the cluster."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    need = {k: v * workers_per_node for k, v in worker_resources(parallel).items()}
    n_nodes = parallel.num_workers // workers_per_node
    deadline, said = time.monotonic() + wait_s, False
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in need.items())
                 and raylet_answers(n)]
        if len(nodes) >= n_nodes or time.monotonic() >= deadline:
            break
        if not said:
            log.warning("waiting up to %.0f s for %d Ray nodes with %s each (%d now) to place the workers again",
                        wait_s, n_nodes, need, len(nodes))
            said = True
        time.sleep(1.0)
    nodes.sort(key=lambda n: (not n["Resources"].get("node:__internal_head__"), n["NodeID"]))
    if len(nodes) < n_nodes:
        waited = f" after waiting {wait_s:.0f} s (cluster.rejoin_timeout_s)" if wait_s else ""
        raise ConfigError(
            f"cluster.workers_per_node={workers_per_node} with parallel.num_workers={parallel.num_workers} needs "
            f"{n_nodes} nodes with {need} each, but the Ray cluster has {len(nodes)} such nodes{waited}: add nodes, "
            f"or lower parallel.num_workers or the resources per worker."
        )
    return [{NODE_ID_LABEL_KEY: nodes[i // workers_per_node]["NodeID"]} for i in range(parallel.num_workers)]


def raylet_answers(node: dict, timeout_s: float = 2.0) -> bool:
    """Whether the node's raylet accepts a connection. Ray's GCS calls a node alive until its health checks have
    failed for a while (15 s and more) after its raylet died; placing workers there meanwhile would wait forever."""
    try:
        socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout_s).close()
        return True
    except OSError:
        return False


def launch_ray(spec: RunSpec, link: RunLink, run_dir: Path, max_failures: int = 0, placement_strategy: str = "PACK",
               workers_per_node: int | None = None, rejoin_timeout_s: float = 600.0) -> TrainOutcome:
    """Run train_worker on parallel.num_workers Ray Train workers (reporting to the MLflow run `link`) and return
    rank 0's outcome. A worker group that fails (a worker's error, a worker or a whole node killed) is launched
    again up to max_failures times (-1: without limit), placed afresh on the nodes alive then (waiting up to
    rejoin_timeout_s for enough of them, such as a replacement node), and resumes from the latest complete
    checkpoint of this launch (pipeline.train.worker.resume_point). Relaunching here rather than through Ray
    Train's FailureConfig is what lets the placement change: Ray Train restarts a group with the placement it
    was given, which names the nodes (cluster.workers_per_node), one of which may be gone."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    parallel, failures = spec.parallel, 0
    selectors = None if workers_per_node is None else workers_on_nodes(parallel, workers_per_node)
    while True:
        try:
            return _fit(spec, link, run_dir, placement_strategy, selectors)
        except TrainingFailedError as err:
            failures += 1
            if 0 <= max_failures < failures:
                raise
            log.warning("the worker group failed (%s): launching it again from the latest complete checkpoint "
                        "(failure %d of %s)", str(err).strip().splitlines()[0][:300], failures,
                        "no limit" if max_failures < 0 else max_failures)
            if workers_per_node is not None:
                selectors = workers_on_nodes(parallel, workers_per_node, wait_s=rejoin_timeout_s)


def _fit(spec: RunSpec, link: RunLink, run_dir: Path, placement_strategy: str,
         selectors: list[dict[str, str]] | None) -> TrainOutcome:
    """One worker group, start to end (Ray Train retries nothing itself)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    parallel = spec.parallel
    placement = {} if selectors is None else {"label_selector": selectors}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"spec": spec, "link": link},
        scaling_config=ScalingConfig(
            num_workers=parallel.num_workers,
            use_gpu=parallel.use_gpu,
            resources_per_worker=worker_resources(parallel),
            placement_strategy=placement_strategy,
            **placement,
        ),
        torch_config=TorchConfig(backend="nccl" if parallel.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    outcome = getattr(result, "return_value", None)  # Ray Train v2 from Ray 2.56
    if not isinstance(outcome, TrainOutcome):
        raise RuntimeError(f"Ray Train handed back no outcome from rank 0 (got {type(outcome).__name__}): the "
                           f"pipeline needs Ray >= 2.56 with Ray Train v2 (RAY_TRAIN_V2_ENABLED unset or 1).")
    return outcome
