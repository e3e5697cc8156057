"""Training workers under Ray Train: one TorchTrainer worker per rank, each running train_worker; rank 0's
outcome comes back to the driver as the training function's return value (Ray Train's Result.return_value), so
no node needs a disk the driver reads."""

from __future__ import annotations

import dataclasses
import logging
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


def workers_on_nodes(parallel: ParallelConfig, workers_per_node: int) -> list[dict[str, str]]:
    """One Ray label selector per worker that puts exactly workers_per_node of them on each of the first
    num_workers / workers_per_node alive nodes with room for them (by node id, head first)."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    need = {k: v * workers_per_node for k, v in worker_resources(parallel).items()}
    nodes = [n for n in ray.nodes() if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in need.items())]
    nodes.sort(key=lambda n: (not n["Resources"].get("node:__internal_head__"), n["NodeID"]))
    n_nodes = parallel.num_workers // workers_per_node
    if len(nodes) < n_nodes:
        raise ConfigError(
            f"cluster.workers_per_node={workers_per_node} with parallel.num_workers={parallel.num_workers} needs "
            f"{n_nodes} nodes with {need} each, but the Ray cluster has {len(nodes)} such nodes: add nodes, or "
            f"lower parallel.num_workers or the resources per worker."
        )
    return [{NODE_ID_LABEL_KEY: nodes[i // workers_per_node]["NodeID"]} for i in range(parallel.num_workers)]


def launch_ray(spec: RunSpec, link: RunLink, run_dir: Path, max_failures: int = 0, placement_strategy: str = "PACK",
               workers_per_node: int | None = None) -> TrainOutcome:
    """Run train_worker on parallel.num_workers Ray Train workers (reporting to the MLflow run `link`) and return
    rank 0's outcome."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    parallel = spec.parallel
    placement = {} if workers_per_node is None else {"label_selector": workers_on_nodes(parallel, workers_per_node)}
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
            failure_config=FailureConfig(max_failures=max_failures),
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
