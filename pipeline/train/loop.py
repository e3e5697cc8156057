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

A skipped step does not count: the step number, the learning-rate schedule (DeepSpeed does not step it) and
the data position (a function of the step) stay together, and the retry sees the same batch (fp16 with a lower
loss scale).

Every concern around the step is one Callback (pipeline.train.callbacks); adding a concern means adding one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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


@dataclass
class LoopState:
    """What callbacks see of the run, and how one of them stops it."""

    engine: object  # the DeepSpeed engine
    start_step: int
    max_steps: int
    stopped: bool = False  # set by a callback that ends the run at this step (e.g. preemption)
    failure: str | None = None  # why a callback stopped the run when it failed (e.g. the loss diverged)
    step: int = 0  # optimizer steps completed (updates applied), set by run_loop
    # Seconds spent in callbacks so far (validation, checkpoints, logging): throughput leaves them out.
    callback_s: float = 0.0


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
    """Train from state.start_step to state.max_steps unless a callback stops the run first."""
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
                return state
        step = state.step = step + result.applied
    for callback in callbacks:
        callback.at_end(state)
    return state
