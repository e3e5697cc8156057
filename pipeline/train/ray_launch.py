"""Training workers under Ray Train: one TorchTrainer worker per rank, each running train_worker; rank 0's
outcome comes back to the driver through the run directory."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pipeline.config import ConfigError, ParallelConfig
from pipeline.files import write_atomic
from pipeline.train.job import TrainJob, TrainOutcome

log = logging.getLogger(__name__)


OUTCOME_FILE = "train_outcome.json"


def _ray_worker(config: dict) -> None:
    import ray
    import torch.distributed as dist

    from pipeline.redaction import install_log_filter, remember_secrets
    from pipeline.train.worker import train_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job: TrainJob = config["job"]
    remember_secrets(job.tracking_uri, job.storage_uri)  # what the worker logs reaches the driver's output
    install_log_filter()
    outcome = train_worker(job)
    # Which Ray node each rank ran on, for the record (placement across nodes shows here).
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    outcome = dataclasses.replace(outcome, worker_nodes=nodes)
    # Ray Train only hands metrics back with a Ray checkpoint; our checkpoints are DeepSpeed's, so rank 0
    # leaves its outcome in the run directory for the driver.
    if dist.get_rank() == 0:
        write_atomic(Path(job.run_dir) / OUTCOME_FILE, json.dumps(asdict(outcome)))


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


def launch_ray(job: TrainJob, run_dir: Path, max_failures: int = 0, placement_strategy: str = "PACK",
               workers_per_node: int | None = None) -> TrainOutcome:
    """Run train_worker on parallel.num_workers Ray Train workers and return rank 0's outcome."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    parallel = job.parallel
    placement = {} if workers_per_node is None else {"label_selector": workers_on_nodes(parallel, workers_per_node)}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"job": job},
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
    outcome_file = run_dir / OUTCOME_FILE
    outcome_file.unlink(missing_ok=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    outcome = json.loads(outcome_file.read_text())
    outcome["losses"] = {int(k): v for k, v in outcome["losses"].items()}
    return TrainOutcome(**outcome)
