"""The training loop: one optimizer step after another, with callbacks at named points around it.

    step = start_step
    while step < max_steps:
        result = train_step(...)                      # forward, backward, DeepSpeed step; the loss over ranks
        if not result.applied:                        # non-finite gradients: DeepSpeed skipped the update
            callback.after_skipped_step(state, result) for each callback; retry the step on the same batch
        else:
            callback.after_step(state, result) for each  # metrics, validation, preemption, checkpoints, ...
            step += 1
        a callback may stop the run (preemption; too many skipped steps)
    if not stopped: callback.at_end(state)            # the run reached max_steps
    on an exception: callback.on_error(state, error) for each, then it propagates
    always: callback.close(state) for each; the batches are closed and rank 0's metrics flushed

Callbacks report through the state: `state.record_metrics` / `record_tags` (rank 0 sends them to MLflow, the
other ranks drop them), `state.log` (rank 0 writes the line), and what the run hands back in `state.record`
(the worker turns it into the driver's TrainOutcome): no callback holds a rank or a tracker of its own.

A skipped step does not count: the step number, the learning-rate schedule (DeepSpeed does not step it) and
the data position (a function of the step) stay together, and the retry sees the same batch (fp16 with a lower
loss scale).

Every concern around the step is one Callback (pipeline.train.callbacks); adding a concern means adding one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.data.loader import RankBatches
from pipeline.train.distributed import grad_norm, mean_over_ranks


@dataclass
class StepResult:
    index: int  # 0-based: the step just taken
    loss: float  # mean over ranks of the step's mean micro-batch loss
    grad_norm: float | None  # before clipping; only where a callback asked for it (it costs a reduction)
    started_at: float  # time.perf_counter() when the step began
    applied: bool = True  # False: DeepSpeed (or the optimizer) skipped the update for non-finite gradients
    loss_scale: float | None = None  # fp16's dynamic loss scale after the step (None in bf16 and fp32)
    z_loss: float | None = None  # mean log^2 Z over ranks when model.z_loss > 0 (loss is then the cross-entropy)

    @property
    def done(self) -> int:
        """Steps completed after this one: the step number that metrics and checkpoints carry."""
        return self.index + 1


log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What the run hands back, filled in by the callbacks (rank 0's becomes the driver's TrainOutcome)."""

    losses: dict[int, float] = field(default_factory=dict)  # per step, when the run records them
    grad_norms: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)  # validation loss by step
    val_tokens: int = 0  # validation tokens scored, and the seconds it took
    val_seconds: float = 0.0
    downstream: dict[int, dict[str, float]] = field(default_factory=dict)  # lm_eval.<task>.<metric> by step
    tokens_per_s: float = 0.0  # of the last logged window
    steady_tokens_per_s: float | None = None  # from the end of the second step to the end (None: too short)
    final_step: int | None = None  # the step of the run's last checkpoint (the end, or where it was preempted)
    checkpoint: Path | None = None  # that checkpoint
    preempted: bool = False


@dataclass
class LoopState:
    """What callbacks see of the run, how they report (the metric sink) and how one of them stops it."""

    engine: Any  # the DeepSpeed engine
    start_step: int
    max_steps: int
    rank: int = 0
    tracker: Any = None  # rank 0's MLflow tracker (pipeline.tracking.Tracker), None elsewhere or without tracking
    stopped: bool = False  # set by a callback that ends the run at this step (e.g. preemption)
    failure: str | None = None  # why a callback stopped the run when it failed (e.g. the loss diverged)
    step: int = 0  # optimizer steps completed (updates applied), set by run_loop
    # Seconds spent in callbacks so far (validation, checkpoints, logging): throughput leaves them out.
    callback_s: float = 0.0
    record: RunRecord = field(default_factory=RunRecord)

    def record_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics of the run at `step`: rank 0 sends them to MLflow (values are those reduced over ranks)."""
        if self.rank == 0 and self.tracker is not None:
            self.tracker.log(metrics, step=step)

    def record_metric(self, name: str, value: float, step: int) -> None:
        self.record_metrics({name: value}, step)

    def record_tags(self, tags: dict[str, str]) -> None:
        """Constants of the run (MLflow tags), from rank 0."""
        if self.rank == 0 and self.tracker is not None:
            self.tracker.set_tags(tags)

    def log(self, level: int, message: str, *args) -> None:
        """A line of the run's log, written once (by rank 0)."""
        if self.rank == 0:
            log.log(level, message, *args)


class Callback:
    """A concern around the step. Override the points you need; the defaults do nothing."""

    def wants_grad_norm(self, done: int) -> bool:
        """Whether this callback reads StepResult.grad_norm at step `done` (it costs a reduction)."""
        return False

    def after_step(self, state: LoopState, result: StepResult) -> None:
        """After every optimizer step, in the order of the callback list."""

    def after_skipped_step(self, state: LoopState, result: StepResult) -> None:
        """After a step whose update was skipped (non-finite gradients); the step is then tried again."""

    def at_end(self, state: LoopState) -> None:
        """Once, when the run reached max_steps (not when a callback stopped it)."""

    def on_error(self, state: LoopState, error: BaseException) -> None:
        """When the loop raises (the error propagates after every callback saw it)."""

    def close(self, state: LoopState) -> None:
        """Always, last: release what the callback holds (threads, files)."""


def train_step(engine, batches: RankBatches, step: int, device: torch.device, want_grad_norm: bool,
               zero_stage: int, tensor_parallel: int) -> StepResult:
    """One optimizer step over batches.grad_accum micro-batches of this rank."""
    started_at = time.perf_counter()
    plain_grad_norm = None
    # Summed on the device: the one host synchronisation of the step is the reduction over ranks below.
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    z_coefficient = engine.module.cfg.z_loss
    step_z = torch.zeros((), dtype=torch.float64, device=device)
    for micro_step in range(batches.grad_accum):
        inputs, targets = batches.micro_batch_at(step, micro_step, device)
        _, loss = engine(inputs, targets)
        engine.backward(loss)
        if z_coefficient:  # report the cross-entropy as the loss and the z term beside it
            z = engine.module.last_z_loss.double()
            step_z += z / batches.grad_accum
            loss = loss.detach().double() - z_coefficient * z
        if micro_step == batches.grad_accum - 1 and zero_stage == 0 and want_grad_norm:
            plain_grad_norm = grad_norm(engine.module, tensor_parallel)  # DeepSpeed reports none without ZeRO
        engine.step()
        step_loss += loss.detach().double() / batches.grad_accum
    step_loss = mean_over_ranks(step_loss, device)
    z_loss = mean_over_ranks(step_z, device) if z_coefficient else None
    norm = engine.get_global_grad_norm() if want_grad_norm else None
    norm = plain_grad_norm if norm is None else norm
    return StepResult(step, step_loss, float(norm) if norm is not None else None, started_at,
                      applied=engine.was_step_applied(), loss_scale=loss_scale_of(engine), z_loss=z_loss)


def loss_scale_of(engine) -> float | None:
    """fp16's current dynamic loss scale (DeepSpeed's fp16 and ZeRO optimizers expose it); None otherwise."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


def run_loop(state: LoopState, callbacks: list[Callback], batches: RankBatches, device: torch.device,
             zero_stage: int, tensor_parallel: int) -> LoopState:
    """Train from state.start_step to state.max_steps unless a callback stops the run first. Owns the cleanup:
    every callback's close, the batches' reader, rank 0's queued metrics."""
    try:
        _steps(state, callbacks, batches, device, zero_stage, tensor_parallel)
        if not state.stopped:
            for callback in callbacks:
                callback.at_end(state)
    except BaseException as error:
        for callback in callbacks:
            callback.on_error(state, error)
        raise
    finally:
        for callback in callbacks:
            callback.close(state)
        batches.close()
        if state.tracker is not None:
            state.tracker.flush()
    return state


def _steps(state: LoopState, callbacks: list[Callback], batches: RankBatches, device: torch.device,
           zero_stage: int, tensor_parallel: int) -> None:
    state.engine.train()
    step = state.step = state.start_step
    while step < state.max_steps:
        want_grad_norm = any(c.wants_grad_norm(step + 1) for c in callbacks)
        result = train_step(state.engine, batches, step, device, want_grad_norm, zero_stage, tensor_parallel)
        for callback in callbacks:
            started = time.perf_counter()
            (callback.after_step if result.applied else callback.after_skipped_step)(state, result)
            state.callback_s += time.perf_counter() - started
            if state.stopped:
                return
        step = state.step = step + result.applied
