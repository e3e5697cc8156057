"""The concerns around the training step, one small class each (pipeline.train.loop calls them in list order).

    LossHistory          per-step losses and gradient norms for the driver (equivalence tests)
    MetricsLogger        train loss, lr, grad norm, tokens/s, MFU, memory: to the log and MLflow
    SteadyThroughput     tokens/s after the first two steps (start-up left out)
    StepTimes            when the first and the last step ended, for the start-up report
    NonFiniteGuard       skipped updates (non-finite gradients) counted and logged; too many in a row stop the run
    Validation           validation loss on the workers every train.eval_interval_steps and at the end
    Downstream           lm-eval tasks scored on the workers every train.downstream_interval_steps and at the end
    PreemptionCheck      a signal or PREEMPT file on any rank: checkpoint, then stop
    PeriodicCheckpoint   a checkpoint every train.save_interval_steps
    FinalCheckpoint      the checkpoint at max_steps
    SystemMetrics        MLflow's system metrics of the node, sampled on a thread (closed with the loop)

Checkpointer saves a checkpoint of the run with the client state a resume needs; the three checkpoint callbacks
share one. Constructors take keywords only; callbacks report through the loop state (metrics, tags, the log line
of rank 0, the run's record) and hold no rank or tracker.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from pathlib import Path

import torch

from pipeline.checkpoint.async_write import ShardWriter
from pipeline.checkpoint.save_load import PendingCheckpoint, start_checkpoint
from pipeline.checkpoint.store_sync import CheckpointUploads
from pipeline.cluster.storage import Mirror
from pipeline.data.downstream import downstream_scores, task_manager, worker_lm
from pipeline.data.loader import RankBatches
from pipeline.data.validation import sharded_validation_totals
from pipeline.train.loop import Callback, LoopState, StepResult
from pipeline.train.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag
from pipeline.train.run_spec import RunSpec
from pipeline.train.throughput import memory_mb, mfu

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves the run's checkpoints (collective: every rank calls save) with what a resume needs. With
    train.async_checkpoint a save returns once every rank copied its state, and the checkpoint is committed by
    `poll` at a later step boundary (or by the next save, or a save that must `wait`); one at most is in flight."""

    def __init__(self, *, engine, spec: RunSpec, batches: RankBatches, ckpt_root: Path, world: int,
                 mirror: Mirror, device: torch.device):
        self.engine, self.spec, self.batches = engine, spec, batches
        self.ckpt_root, self.world, self.device = ckpt_root, world, device
        self.uploads = CheckpointUploads(mirror, background=spec.background_uploads,
                                         keep_local=spec.local_checkpoints)
        self.layout = {"zero_stage": spec.parallel.zero_stage, "tensor_parallel": spec.parallel.tensor_parallel,
                       "precision": spec.precision}
        self.writer = ShardWriter() if spec.train.async_checkpoint else None
        self.pending: PendingCheckpoint | None = None

    def client_state(self, step: int) -> dict:
        spec = self.spec
        return {
            "step": step,
            "samples_consumed": self.batches.samples_consumed(step),
            "data_seed": spec.train.seed,
            "config_fingerprint": spec.config_fingerprint,
            "tokenizer_sha256": spec.tokenizer_sha256,
            "launch_id": spec.launch_id,
            "world_size": self.world,
            "tensor_parallel": spec.parallel.tensor_parallel,
            # Not a layout a load must match: ZeRO partitions over all ranks with or without it.
            "sequence_parallel": spec.parallel.sequence_parallel,
            "math_config": spec.math_config,
        }

    def save(self, step: int, wait: bool = False) -> Path:
        """Save at `step`; with an object store the upload goes on in the background unless `wait` (the run's
        last checkpoint, or a preemption's: the run ends only once it is committed and in the store)."""
        self.finish()
        # A save that must wait gains nothing from a copy in memory: written directly, as without async_checkpoint.
        writer = None if wait else self.writer
        pending = start_checkpoint(self.engine, self.ckpt_root, step, self.client_state(step),
                                   self.spec.train.keep_last_checkpoints, self.layout, self.uploads, writer)
        if writer is not None:
            self.pending = pending
            return pending.tag_dir
        tag_dir = pending.commit()
        if wait:
            self.uploads.wait()
        return tag_dir

    def poll(self) -> bool:
        """Collective: commit the checkpoint in flight if every rank has written its files. Whether it did."""
        if self.pending is None or not self.pending.written_everywhere(self.device):
            return False
        self.finish()
        return True

    def finish(self) -> None:
        """Collective: commit the checkpoint in flight, waiting for its writes."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.commit()


class LossHistory(Callback):
    """Every step's loss and gradient norm, kept when the run asks for them (spec.record_losses)."""

    def __init__(self, *, record: bool):
        self.record = record

    def wants_grad_norm(self, done: int) -> bool:
        return self.record

    def after_step(self, state: LoopState, result: StepResult) -> None:
        if not self.record:
            return
        state.record.losses[result.index] = result.loss
        if result.grad_norm is not None:
            state.record.grad_norms[result.index] = result.grad_norm


class MetricsLogger(Callback):
    """Every train.log_interval_steps (and at the last step): the window's mean loss and rates, logged by rank
    0 and sent to MLflow when a tracker is given. Rates count the time of the training steps only, not that of
    validation, checkpoints or other callbacks; tokens seen follow the samples consumed (right across a resume
    with another global batch)."""

    def __init__(self, *, spec: RunSpec, batches: RankBatches, world: int, peak_tflops: float, device: torch.device):
        self.interval, self.max_steps = spec.train.log_interval_steps, spec.train.max_steps
        self.flops_per_token, self.batches, self.context = spec.flops_per_token, batches, spec.model.context_length
        self.tokens_per_step = batches.global_batch * self.context
        self.world, self.peak_tflops, self.device = world, peak_tflops, device
        self.window_loss, self.window_z, self.window_steps = 0.0, 0.0, 0
        self.window_start, self.window_callback_s = time.perf_counter(), 0.0

    def logs_at(self, done: int) -> bool:
        return done % self.interval == 0 or done == self.max_steps

    def wants_grad_norm(self, done: int) -> bool:
        return self.logs_at(done)  # the logged metrics include it

    def after_step(self, state: LoopState, result: StepResult) -> None:
        self.window_loss += result.loss
        self.window_z += result.z_loss or 0.0
        self.window_steps += 1
        done = result.done
        if not self.logs_at(done):
            return
        training_s = time.perf_counter() - self.window_start - (state.callback_s - self.window_callback_s)
        tokens_per_s = state.record.tokens_per_s = self.tokens_per_step * self.window_steps / training_s
        metrics = {
            "train_loss": self.window_loss / self.window_steps,
            "lr": state.engine.get_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s / self.world, self.flops_per_token, self.peak_tflops),
            "step_time_s": time.perf_counter() - result.started_at,
            "memory_mb": memory_mb(self.device),
            "tokens_seen": self.batches.samples_consumed(done) * self.context,
            **self.batches.source_metrics(done),  # epochs (a blend: shares seen and epochs per source)
        }
        if result.z_loss is not None:  # model.z_loss > 0: train_loss is the cross-entropy, this the log^2 Z term
            metrics["z_loss"] = self.window_z / self.window_steps
        state.log(logging.INFO, "step %d/%d loss %.4f lr %.2e %.0f tok/s mfu %.3f", done, self.max_steps,
                  metrics["train_loss"], metrics["lr"], tokens_per_s, metrics["mfu"])
        state.record_metrics(metrics, step=done)
        self.window_loss, self.window_z, self.window_steps = 0.0, 0.0, 0
        self.window_start, self.window_callback_s = time.perf_counter(), state.callback_s


class StepTimes(Callback):
    """When the first and the last step of this run ended (wall clock), for the start-up report."""

    def __init__(self, *, timeline: dict[str, float]):
        self.timeline = timeline
        self.steps = 0

    def after_step(self, state: LoopState, result: StepResult) -> None:
        now = time.time()
        self.timeline.setdefault("first_step_done", now)
        self.timeline["last_step_done"] = now
        self.steps += 1
        self.timeline["steps"] = self.steps


class SteadyThroughput(Callback):
    """Tokens/s from the end of the run's second step to its end: the rate without start-up (and without the
    time of callbacks)."""

    def __init__(self, *, start_step: int, tokens_per_step: int):
        self.start_step, self.tokens_per_step = start_step, tokens_per_step
        self.started: float | None = None
        self.callback_s_at_start = 0.0

    def after_step(self, state: LoopState, result: StepResult) -> None:
        if result.done == self.start_step + 2:
            self.started, self.callback_s_at_start = time.perf_counter(), state.callback_s

    def at_end(self, state: LoopState) -> None:
        steps = state.max_steps - (self.start_step + 2)
        if self.started is not None and steps > 0:
            training_s = time.perf_counter() - self.started - (state.callback_s - self.callback_s_at_start)
            state.record.steady_tokens_per_s = self.tokens_per_step * steps / training_s


class NonFiniteGuard(Callback):
    """A step whose gradients were not finite (a loss spike, a learning rate far too high, fp16 overflow) is
    skipped by DeepSpeed or the optimizer and tried again on the same batch; it is logged and counted
    (skipped_steps in MLflow). After max_consecutive skips of the same step the run stops, naming the step: no
    checkpoint is written then, so the complete ones before it stay as they are.

    fp16 with dynamic loss scaling skips steps by design while the scale settles (the loss is finite, the
    scaled gradients overflowed, DeepSpeed halves the scale): those are counted apart (loss_scale_overflows)
    and stop the run only when the scale has reached its minimum (MIN_LOSS_SCALE, where DeepSpeed would raise
    on the next overflow) after more than max_consecutive skips in a row."""

    MIN_LOSS_SCALE = 1.0  # fp16.min_loss_scale in pipeline.train.ds_config

    def __init__(self, *, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive, self.total, self.overflows = 0, 0, 0

    def after_step(self, state: LoopState, result: StepResult) -> None:
        self.consecutive = 0

    def after_skipped_step(self, state: LoopState, result: StepResult) -> None:
        overflow = result.loss_scale is not None and math.isfinite(result.loss)
        self.consecutive += 1
        self.total += 1
        self.overflows += overflow
        settling = overflow and result.loss_scale > self.MIN_LOSS_SCALE
        what = f"fp16 overflow at loss scale {result.loss_scale:g}" if overflow else "not finite"
        state.log(logging.WARNING, "step %d: loss %s, gradient norm %s (%s): the update was skipped (%d in a row, "
                  "at most %d)", result.done, result.loss, result.grad_norm, what, self.consecutive,
                  self.max_consecutive)
        state.record_metrics({"skipped_steps": self.total, "loss_scale_overflows": self.overflows}, step=result.done)
        if self.consecutive > self.max_consecutive and not settling:
            state.stopped = True
            state.failure = (
                f"training diverged at step {result.done}: its gradients were not finite {self.consecutive} times "
                f"in a row (loss {result.loss}); no checkpoint was written after step {result.index}. Lower "
                f"train.lr (now {state.engine.get_lr()[0]:.3g} at this step) or raise train.warmup_steps, and resume "
                f"from the last complete checkpoint (train.resume=auto); train.max_skipped_steps sets the patience."
            )


class Validation(Callback):
    """Validation loss, perplexity and bits per byte over the evaluation budget (eval.max_tokens; the whole
    validation split when null), scored on the workers with the training layout (pipeline.data.validation),
    every train.eval_interval_steps and at the last step; logged as val_loss, val_perplexity,
    val_bits_per_byte (bits per UTF-8 byte of text) and val_tokens at the step, and kept for the driver."""

    def __init__(self, *, dataset, interval: int, micro_batch: int, max_tokens: int | None, byte_lengths,
                 device: torch.device, dp_size: int, dp_rank: int, tp: int):
        self.dataset, self.interval, self.micro_batch, self.max_tokens = dataset, interval, micro_batch, max_tokens
        self.byte_lengths, self.device = byte_lengths, device
        self.dp_size, self.dp_rank, self.tp = dp_size, dp_rank, tp

    def evaluate(self, state: LoopState, step: int) -> None:
        record = state.record
        if not len(self.dataset) or step in record.val_losses:
            return
        started = time.perf_counter()
        totals = sharded_validation_totals(state.engine, self.dataset, self.micro_batch, self.max_tokens,
                                           self.byte_lengths, self.device, self.dp_size, self.dp_rank, self.tp)
        record.val_seconds += time.perf_counter() - started
        record.val_tokens += totals.tokens
        record.val_losses[step] = totals.mean_loss
        state.log(logging.INFO, "step %d validation loss %.4f (perplexity %.2f, %.3f bits/byte) over %d tokens", step,
                  totals.mean_loss, totals.perplexity, totals.bits_per_byte, totals.tokens)
        state.record_metrics({"val_loss": totals.mean_loss, "val_perplexity": totals.perplexity,
                              "val_bits_per_byte": totals.bits_per_byte, "val_tokens": float(totals.tokens),
                              "val_tokens_per_s": record.val_tokens / record.val_seconds}, step=step)

    def after_step(self, state: LoopState, result: StepResult) -> None:
        if self.interval and result.done % self.interval == 0:
            self.evaluate(state, result.done)

    def at_end(self, state: LoopState) -> None:
        self.evaluate(state, max(state.start_step, state.max_steps))


class Downstream(Callback):
    """eval.tasks (lm-eval-harness, offline) scored on the workers with the training layout, each data-parallel
    replica a share of the examples (pipeline.data.downstream), every train.downstream_interval_steps and at the
    last step; logged as lm_eval.<task>.<metric> at the step and kept for the driver."""

    def __init__(self, *, tasks: list[str], limit: int | None, interval: int, micro_batch: int, tokenizer,
                 context_length: int, device: torch.device, dp_size: int, dp_rank: int, replica: int):
        self.tasks, self.limit, self.interval = tasks, limit, interval
        self.lm_args = dict(tokenizer=tokenizer, context_length=context_length, micro_batch=micro_batch,
                            device=device, dp_size=dp_size, dp_rank=dp_rank, replica=replica)
        self.scratch = tempfile.TemporaryDirectory(prefix="lm_eval_tasks-")  # the task files' copies
        self.manager = task_manager(Path(self.scratch.name), tasks)
        self.scored: set[int] = set()

    def evaluate(self, state: LoopState, step: int) -> None:
        if step in self.scored:
            return
        self.scored.add(step)
        started = time.perf_counter()
        scores = downstream_scores(worker_lm(state.engine, **self.lm_args), self.manager, self.tasks, self.limit)
        if scores is None:  # another replica's ranks: replica 0 holds the gathered scores
            return
        metrics = {f"lm_eval.{task}.{name}": value for task, values in scores.items() for name, value in values.items()}
        state.record.downstream[step] = metrics
        state.log(logging.INFO, "step %d downstream (%.1fs): %s", step, time.perf_counter() - started,
                  ", ".join(f"{k.removeprefix('lm_eval.')} {v:.4f}" for k, v in sorted(metrics.items())))
        state.record_metrics(metrics, step=step)

    def after_step(self, state: LoopState, result: StepResult) -> None:
        if result.done % self.interval == 0:
            self.evaluate(state, result.done)

    def at_end(self, state: LoopState) -> None:
        self.evaluate(state, max(state.start_step, state.max_steps))

    def close(self, state: LoopState) -> None:
        self.scratch.cleanup()


class SystemMetrics(Callback):
    """MLflow's system metrics collectors (CPU and memory, disk, network, NVIDIA or AMD GPUs), sampled on a
    background thread every `interval` seconds and sent through the worker's tracker, whose queue outlives a
    tracking server outage (MLflow's own SystemMetricsMonitor blocks on an unreachable server and stops for good
    after one failure). Logged as <prefix><name> (system/<name> by default) at the training step reached; the
    mean over the interval."""

    def __init__(self, *, tracker, interval: float, prefix: str = "system/", owns_tracker: bool = False):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.tracker, self.interval, self.prefix, self.step = tracker, interval, prefix, 0
        self.owns_tracker = owns_tracker  # finish() then flushes it too
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        for gpu in ("gpu_monitor.GPUMonitor", "rocm_monitor.ROCMMonitor"):
            module, name = gpu.split(".")
            try:
                self.monitors.append(getattr(__import__(f"mlflow.system_metrics.metrics.{module}", fromlist=[name]),
                                             name)())
                break
            except Exception:  # noqa: BLE001 - no such GPU or library on this node
                continue
        self._stop = threading.Event()
        self._pending = 0  # samples taken since the last publish
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)

    def start(self) -> SystemMetrics:
        self._thread.start()
        return self

    def _sample(self) -> None:
        for monitor in self.monitors:
            monitor.collect_metrics()
        self._pending += 1

    def _publish(self) -> None:
        metrics = {}
        for monitor in self.monitors:
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        self._pending = 0
        self.tracker.log({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=self.step)

    def _run(self) -> None:
        samples = max(1, round(self.interval))  # about one sample a second, averaged over the interval
        while not self._stop.is_set():
            for _ in range(samples):
                self._sample()
                if self._stop.wait(self.interval / samples):
                    return
            self._publish()

    def after_step(self, state: LoopState, result: StepResult) -> None:
        self.step = result.done

    def close(self, state: LoopState | None = None) -> None:
        """Stop sampling and log what was sampled since the last interval (a run shorter than one interval
        still gets its system metrics once)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            if not self._pending:
                self._sample()
            self._publish()
        if self.owns_tracker:
            self.tracker.flush()


class PreemptionCheck(Callback):
    """When any rank was signalled (or the driver left a PREEMPT file): save a checkpoint and stop the run."""

    def __init__(self, *, flag: PreemptionFlag, checkpointer: Checkpointer, device: torch.device):
        self.flag, self.checkpointer, self.device = flag, checkpointer, device

    def after_step(self, state: LoopState, result: StepResult) -> None:
        if result.done >= state.max_steps or not self.flag.any_rank(self.device):
            return
        record = state.record
        record.final_step, record.checkpoint = result.done, self.checkpointer.save(result.done, wait=True)
        record.preempted = state.stopped = True
        state.log(logging.WARNING, "preempted: saved %s at step %d; exiting with code %d", record.checkpoint,
                  result.done, PREEMPTED_EXIT_CODE)
        state.record_tags({"preempted_at_step": str(result.done)})

    def close(self, state: LoopState) -> None:
        self.flag.close()


class PeriodicCheckpoint(Callback):
    """A checkpoint every train.save_interval_steps (0: none) and at each of train.save_at_steps, and the seconds
    it stalled training (`checkpoint_stall_s`); the last step has FinalCheckpoint."""

    def __init__(self, *, checkpointer: Checkpointer, interval: int, at_steps: list[int] | None = None):
        self.checkpointer, self.interval, self.at_steps = checkpointer, interval, set(at_steps or [])

    def after_step(self, state: LoopState, result: StepResult) -> None:
        started = time.perf_counter()
        if self.checkpointer.poll():  # an asynchronous checkpoint written on every rank: committed now
            state.record_metric("checkpoint_commit_s", time.perf_counter() - started, result.done)
        due = (self.interval and result.done % self.interval == 0) or result.done in self.at_steps
        if due and result.done < state.max_steps:
            started = time.perf_counter()
            self.checkpointer.save(result.done)
            # What the save cost training (rank 0's wait; with an object store, an upload in the background
            # costs nothing here unless the previous one is still running; asynchronous, the copy in memory and
            # the commit of a previous checkpoint still being written).
            state.record_metric("checkpoint_stall_s", time.perf_counter() - started, result.done)


class FinalCheckpoint(Callback):
    """The checkpoint at max_steps (a run resumed at max_steps keeps the one it resumed from), and the final
    step in MLflow."""

    def __init__(self, *, checkpointer: Checkpointer, resumed_from: str | None):
        self.checkpointer, self.resumed_from = checkpointer, resumed_from

    def at_end(self, state: LoopState) -> None:
        final_step = state.record.final_step = max(state.start_step, state.max_steps)
        if state.start_step >= state.max_steps:
            state.record.checkpoint = Path(self.resumed_from)  # the checkpoint already holds the finished run
            state.log(logging.INFO, "the run already reached step %d at %s; nothing to train", state.start_step,
                      self.resumed_from)
        else:
            state.record.checkpoint = self.checkpointer.save(final_step, wait=True)
        state.record_tags({"final_step": str(final_step)})  # a constant of the run: a tag
