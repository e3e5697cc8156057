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
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    # Per-step losses (rank 0) are returned to the driver when true; used by equivalence tests.
    record_losses: bool = False
    extra: dict = field(default_factory=dict)


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


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the (data-parallel averaged) gradients, before clipping."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


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


def train_worker(job: TrainJob) -> TrainOutcome:
    import deepspeed

    from data_prep.shards import WindowDataset
    from pipeline.checkpointing import checkpoint_root, latest_complete, load_checkpoint, save_checkpoint
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

    seed_everything(train.seed)  # identical initial weights on every rank
    model = GPT(job.model)
    if job.parallel.activation_checkpointing:
        model.set_activation_checkpointing(True)
    # Callables: DeepSpeed applies AutoTP sharding first, then builds the optimizer over the sharded model.
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=lambda _params: build_optimizer(model, train),
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, train),
        config=job.ds_config,
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
    ckpt_root = checkpoint_root(Path(job.run_dir))
    start_step, resumed_from = 0, None
    # train.resume=auto looks at the run directory now, so that a worker group Ray restarts after a failure
    # continues from the newest checkpoint; an explicit path comes resolved from the driver.
    if job.resume_from is not None:
        tag_dir = Path(job.resume_from)
    elif train.resume == "auto":
        tag_dir = latest_complete(ckpt_root)
    else:
        tag_dir = None
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
            "world_size": world,
            "tensor_parallel": tp,
            "math_config": job.math_config,
        }

    layout = {"zero_stage": job.parallel.zero_stage, "tensor_parallel": tp, "precision": job.precision}
    tokens_per_step = batches.global_batch * job.model.context_length
    losses: dict[int, float] = {}
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    tokens_per_s = 0.0
    engine.train()
    for step in range(start_step, train.max_steps):
        step_start = time.perf_counter()
        step_loss = 0.0
        plain_grad_norm = None
        for micro_step in range(job.grad_accum_steps):
            inputs, targets = batches.micro_batch_at(step, micro_step)
            _, loss = engine(inputs.to(device), targets.to(device))
            engine.backward(loss)
            if micro_step == job.grad_accum_steps - 1 and job.parallel.zero_stage == 0 and tp == 1:
                plain_grad_norm = _grad_norm(engine.module)  # DeepSpeed reports none without ZeRO
            engine.step()
            step_loss += loss.item() / job.grad_accum_steps
        step_loss = _mean_over_ranks(step_loss, device)
        losses[step] = step_loss
        window_loss += step_loss
        window_steps += 1
        done = step + 1
        if done % train.log_interval_steps == 0 or done == train.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = tokens_per_step * window_steps / elapsed
            grad_norm = engine.get_global_grad_norm()
            grad_norm = plain_grad_norm if grad_norm is None else grad_norm
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
            tag = save_checkpoint(engine, ckpt_root, done, client_state(done), train.keep_last_checkpoints, layout)
            if rank == 0:
                log.warning("preempted: saved %s at step %d; exiting with code %d", tag, done, PREEMPTED_EXIT_CODE)
                if tracker:
                    tracker.set_tags({"preempted_at_step": str(done)})
            return TrainOutcome(done, losses if job.record_losses else {}, True, str(tag), tokens_per_s, resumed_from)
        if train.save_interval_steps and done % train.save_interval_steps == 0 and done < train.max_steps:
            save_checkpoint(engine, ckpt_root, done, client_state(done), train.keep_last_checkpoints, layout)

    final_step = max(start_step, train.max_steps)
    if start_step >= train.max_steps:
        last_tag = Path(resumed_from)  # the checkpoint already holds the finished run: nothing to train
        if rank == 0:
            log.info("the run already reached step %d at %s; nothing to train", start_step, resumed_from)
    else:
        last_tag = save_checkpoint(
            engine, ckpt_root, final_step, client_state(final_step), train.keep_last_checkpoints, layout
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
    )
