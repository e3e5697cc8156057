"""What every training worker runs: build the model, wrap it in a DeepSpeed engine, train, checkpoint.

The same function runs under Ray Train (pipeline.train) and under a plain `torchrun`/`deepspeed` launch
(pipeline.launch): it only needs torch.distributed to be initialisable from the environment.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ModelConfig, ParallelConfig, TrainConfig

log = logging.getLogger(__name__)

PREEMPT_FILE = "PREEMPT"
# Exit code of a worker process that saved a checkpoint and stopped because it was asked to (EX_TEMPFAIL):
# a scheduler can requeue the job and train.resume=auto continues it.
PREEMPTED_EXIT_CODE = 75


@dataclass
class TrainJob:
    """Everything a worker needs, resolved on the driver (plain data: it travels to Ray workers)."""

    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig
    data_dir: str
    run_dir: str
    precision: str
    grad_accum_steps: int
    ds_config: dict
    flops_per_token: float
    config_fingerprint: str
    # The config keys that change the numbers (model, optimisation, data): compared on resume.
    math_config: dict
    tokenizer_sha256: str
    # A checkpoint tag to load (resolved on the driver from train.resume), and whether it is universal.
    resume_from: str | None = None
    # Unique id of this training job (set on the driver), kept in its checkpoints: a worker group that Ray
    # restarts after a failure continues from the job's own newest checkpoint, not from resume_from again.
    job_id: str = ""
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    # Per-step losses and gradient norms (rank 0) are returned to the driver when true; used by equivalence
    # tests.
    record_losses: bool = False
    extra: dict = field(default_factory=dict)
    # cluster.storage_uri: the object store that holds the data set and the checkpoints (pipeline.storage).
    storage_uri: str | None = None


@dataclass
class TrainOutcome:
    final_step: int
    losses: dict[int, float]
    preempted: bool
    checkpoint: str
    tokens_per_s: float
    resumed_from: str | None
    # Ray node id of every rank (filled in under Ray Train).
    worker_nodes: list[str] | None = None
    # Gradient norm (before clipping) of every step, when job.record_losses.
    grad_norms: dict[int, float] = field(default_factory=dict)
    # Elements of the parameters this rank's module holds: fewer than the model's under tensor parallelism
    # (AutoTP shards the projections), 0 under ZeRO-3 (DeepSpeed keeps only flat partitions).
    local_parameters: int = 0
    # Tokens/s from the end of the run's second step to its end: the steady rate, without start-up.
    steady_tokens_per_s: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _init_distributed(parallel: ParallelConfig) -> None:
    import deepspeed

    backend = "nccl" if parallel.use_gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def _device(parallel: ParallelConfig) -> torch.device:
    if parallel.use_gpu:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().device_name(), get_accelerator().current_device())
    return torch.device("cpu")


def _mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _grad_norm(module: torch.nn.Module, tp: int) -> float:
    """Global L2 norm of the (data-parallel averaged) gradients, before clipping, where DeepSpeed reports none
    (ZeRO-0). Under AutoTP a sharded weight (DeepSpeed marks it `tensor_model_parallel`) contributes the sum
    over the tensor-parallel group; a replicated one (norms, embeddings, row-parallel biases) counts once."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is None:
            continue
        square = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += square
        else:
            replicated += square
    if tp > 1:
        from deepspeed.utils import groups

        device = next(module.parameters()).device
        sharded = sharded.to(device)
        dist.all_reduce(sharded, group=groups.get_tensor_model_parallel_group())
        sharded = sharded.cpu()
    return float((sharded + replicated).sqrt())


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (what Slurm and Kubernetes send before killing) or by a PREEMPT file in the run
    directory (how the driver passes a signal on to Ray workers); acted on at the next step boundary."""

    def __init__(self, run_dir: Path):
        self.file = run_dir / PREEMPT_FILE
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            # Not possible outside the main thread (Ray Train runs the loop in a thread): the file serves there.
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def any_rank(self, device: torch.device) -> bool:
        local = self.signalled or self.file.exists()
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@torch.no_grad()
def interval_validation_loss(engine, dataset, micro_batch: int, n_batches: int, device: torch.device) -> float:
    """Mean loss over the first n_batches x micro_batch validation windows. Every rank runs the same batches
    (ZeRO-3 and tensor parallelism need all ranks in each forward); the result is identical on all ranks."""
    from pipeline.evaluate import window_batches

    engine.eval()
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(window_batches(dataset, micro_batch, None)):
        if i == n_batches:
            break
        _, loss = engine(inputs.to(device), targets.to(device))
        total += loss.item() * targets.numel()
        count += targets.numel()
    engine.train()
    return total / max(1, count)


def resume_point(job: TrainJob, ckpt_root: Path) -> tuple[Path | None, dict]:
    """The checkpoint this worker group starts from, and the DeepSpeed config to load it with.

    The job's own newest checkpoint comes first (a restart after a failure, even of a job that began from an
    explicit or universal checkpoint); then the checkpoint the driver resolved; then, for train.resume=auto,
    the latest complete one of the run directory."""
    from pipeline.checkpointing import latest_complete, read_marker

    latest = latest_complete(ckpt_root)
    if latest is not None and job.job_id and read_marker(latest).get("client_state", {}).get("job_id") == job.job_id:
        # Saved by this job at its own layout: a plain load, not a universal one.
        return latest, {k: v for k, v in job.ds_config.items() if k != "checkpoint"}
    if job.resume_from is not None:
        return Path(job.resume_from), job.ds_config
    if job.train.resume == "auto":
        return latest, job.ds_config
    return None, job.ds_config


def _pull_from_store(job: TrainJob):
    """Collective: the first worker of each node downloads what its node lacks of the data set, the run's
    newest checkpoint in the store and the checkpoint the driver resolved (pipeline.storage); the others
    wait. Returns the store, for the uploads of new checkpoints."""
    from pipeline.checkpointing import is_node_leader
    from pipeline.storage import ObjectStore, pull_checkpoint, pull_dataset, pull_latest_checkpoint

    store = ObjectStore(job.storage_uri)
    run_dir = Path(job.run_dir)
    if is_node_leader():
        pull_dataset(store, Path(job.data_dir))
        pull_latest_checkpoint(store, run_dir)
        if job.resume_from and Path(job.resume_from).is_relative_to(run_dir):
            pull_checkpoint(store, run_dir, Path(job.resume_from))
    dist.barrier()
    return store


def train_worker(job: TrainJob) -> TrainOutcome:
    import deepspeed

    from data_prep.shards import WindowDataset
    from pipeline.checkpointing import checkpoint_root, load_checkpoint, save_checkpoint
    from pipeline.data_loader import RankBatches
    from pipeline.model import GPT
    from pipeline.optimizer import build_optimizer, build_scheduler
    from pipeline.throughput import measure_peak_tflops, memory_mb, mfu

    if not job.parallel.use_gpu:
        torch.set_num_threads(job.parallel.cpus_per_worker)
    _init_distributed(job.parallel)
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = job.parallel.tensor_parallel
    dp_size, dp_rank = world // tp, rank // tp
    device = _device(job.parallel)
    train = job.train

    ckpt_root = checkpoint_root(Path(job.run_dir))
    store = _pull_from_store(job) if job.storage_uri else None
    tag_dir, ds_config = resume_point(job, ckpt_root)
    seed_everything(train.seed)  # identical initial weights on every rank
    model = GPT(job.model)
    if job.parallel.activation_checkpointing:
        model.set_activation_checkpointing(True)
    # Callables: DeepSpeed applies AutoTP sharding first, then builds the optimizer over the sharded model.
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=lambda _params: build_optimizer(model, train),
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, train),
        config=ds_config,
    )
    if train.compile:
        engine.compile()

    batches = RankBatches(
        WindowDataset(Path(job.data_dir), "train"),
        seed=train.seed,
        micro_batch=train.micro_batch_size,
        grad_accum=job.grad_accum_steps,
        dp_size=dp_size,
        dp_rank=dp_rank,
    )
    start_step, resumed_from = 0, None
    if tag_dir is not None:
        state = load_checkpoint(engine, tag_dir)
        start_step = int(state["step"])
        batches.resume_at(start_step, int(state["samples_consumed"]))
        resumed_from = str(tag_dir)
        if rank == 0:
            log.info("resumed from %s at step %d (%d samples consumed)", tag_dir, start_step, state["samples_consumed"])
    preemption = PreemptionFlag(Path(job.run_dir))
    val_data = WindowDataset(Path(job.data_dir), "validation") if train.eval_interval_steps else None

    tracker = None
    if rank == 0 and job.mlflow_run_id:
        from pipeline.tracking import Tracker

        tracker = Tracker(job.tracking_uri, job.mlflow_run_id)
    peak_tflops = train.peak_tflops or measure_peak_tflops(job.precision, device)
    if tracker:
        tracker.log({"peak_tflops_per_worker": peak_tflops}, step=start_step)

    def client_state(step: int) -> dict:
        return {
            "step": step,
            "samples_consumed": batches.samples_consumed(step),
            "data_seed": train.seed,
            "config_fingerprint": job.config_fingerprint,
            "tokenizer_sha256": job.tokenizer_sha256,
            "job_id": job.job_id,
            "world_size": world,
            "tensor_parallel": tp,
            "math_config": job.math_config,
        }

    layout = {"zero_stage": job.parallel.zero_stage, "tensor_parallel": tp, "precision": job.precision}
    tokens_per_step = batches.global_batch * job.model.context_length
    losses: dict[int, float] = {}
    grad_norms: dict[int, float] = {}
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    tokens_per_s = 0.0
    steady_start = None
    engine.train()
    for step in range(start_step, train.max_steps):
        step_start = time.perf_counter()
        step_loss = 0.0
        plain_grad_norm = None
        done = step + 1
        log_now = done % train.log_interval_steps == 0 or done == train.max_steps
        for micro_step in range(job.grad_accum_steps):
            inputs, targets = batches.micro_batch_at(step, micro_step)
            _, loss = engine(inputs.to(device), targets.to(device))
            engine.backward(loss)
            last_micro = micro_step == job.grad_accum_steps - 1
            if last_micro and job.parallel.zero_stage == 0 and (log_now or job.record_losses):
                plain_grad_norm = _grad_norm(engine.module, tp)  # DeepSpeed reports none without ZeRO
            engine.step()
            step_loss += loss.item() / job.grad_accum_steps
        step_loss = _mean_over_ranks(step_loss, device)
        losses[step] = step_loss
        window_loss += step_loss
        window_steps += 1
        if done == start_step + 2:
            steady_start = time.perf_counter()
        grad_norm = engine.get_global_grad_norm() if (log_now or job.record_losses) else None
        grad_norm = plain_grad_norm if grad_norm is None else grad_norm
        if job.record_losses and grad_norm is not None:
            grad_norms[step] = float(grad_norm)
        if log_now:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = tokens_per_step * window_steps / elapsed
            metrics = {
                "train_loss": window_loss / window_steps,
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s / world, job.flops_per_token, peak_tflops),
                "step_time_s": time.perf_counter() - step_start,
                "memory_mb": memory_mb(device),
                "tokens_seen": done * tokens_per_step,
            }
            if rank == 0:
                log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f tok/s mfu %.3f",
                    done, train.max_steps, metrics["train_loss"], metrics["lr"], tokens_per_s, metrics["mfu"],
                )
                if tracker:
                    tracker.log(metrics, step=done)
            window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        if val_data is not None and len(val_data) and done % train.eval_interval_steps == 0:
            val_loss = interval_validation_loss(engine, val_data, train.micro_batch_size, train.eval_batches, device)
            if rank == 0:
                log.info("step %d validation loss %.4f", done, val_loss)
                if tracker:
                    tracker.log({"interval_val_loss": val_loss}, step=done)
        if done < train.max_steps and preemption.any_rank(device):
            tag = save_checkpoint(engine, ckpt_root, done, client_state(done), train.keep_last_checkpoints, layout,
                                  store)
            if rank == 0:
                log.warning("preempted: saved %s at step %d; exiting with code %d", tag, done, PREEMPTED_EXIT_CODE)
                if tracker:
                    tracker.set_tags({"preempted_at_step": str(done)})
            return TrainOutcome(done, losses if job.record_losses else {}, True, str(tag), tokens_per_s, resumed_from,
                                grad_norms=grad_norms)
        if train.save_interval_steps and done % train.save_interval_steps == 0 and done < train.max_steps:
            save_checkpoint(engine, ckpt_root, done, client_state(done), train.keep_last_checkpoints, layout, store)

    final_step = max(start_step, train.max_steps)
    steady_steps = final_step - (start_step + 2)
    steady_tokens_per_s = (tokens_per_step * steady_steps / (time.perf_counter() - steady_start)
                           if steady_start is not None and steady_steps > 0 else tokens_per_s)
    if start_step >= train.max_steps:
        last_tag = Path(resumed_from)  # the checkpoint already holds the finished run: nothing to train
        if rank == 0:
            log.info("the run already reached step %d at %s; nothing to train", start_step, resumed_from)
    else:
        last_tag = save_checkpoint(
            engine, ckpt_root, final_step, client_state(final_step), train.keep_last_checkpoints, layout, store
        )
    if tracker:
        tracker.log({"final_step": final_step}, step=final_step)
    return TrainOutcome(
        final_step=final_step,
        losses=losses if job.record_losses else {},
        preempted=False,
        checkpoint=str(last_tag),
        tokens_per_s=tokens_per_s,
        resumed_from=resumed_from,
        grad_norms=grad_norms,
        local_parameters=sum(p.numel() for p in engine.module.parameters()),
        steady_tokens_per_s=steady_tokens_per_s,
    )
