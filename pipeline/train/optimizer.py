"""AdamW with decoupled weight decay on weight matrices only, or Muon for the hidden matrices with AdamW for the
rest; and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from pipeline.config import TrainConfig, width_multiplier, wsd_decay_start


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay 2-D weight matrices; skip norms, biases and embeddings: the token and position tables and the
    unembedding (lm_head), which is the token table itself when tied, so that tying does not change what
    decays. Given lr and a µP model (model.cfg.mup_base_width), the matrices train at lr / m and the rest at lr
    (Yang et al. 2022, Table 3 with the output multiplier: hidden matrices have both fans growing with width)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = any(table in name for table in ("tok_emb", "pos_emb", "lm_head"))
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partition keeps its full shape here
        if len(shape) >= 2 and not is_embedding:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cfg = getattr(model, "cfg", None)
    if lr is not None and cfg is not None and cfg.mup_base_width is not None:
        groups[0]["lr"], groups[1]["lr"] = lr / width_multiplier(cfg), lr
    return groups


def all_gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient of every rank is finite: one flag on the gradients' device (NCCL reduces only
    device tensors), one all-reduce, one host sync. True when there are no gradients."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all().float().reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips its update, leaving weights and state untouched, when any gradient of any rank is not
    finite; `overflow` then tells DeepSpeed's engine, which also skips the learning-rate step and counts it.

    DeepSpeed's ZeRO optimizers (stages 1-3) and its bf16/fp16 optimizers check for non-finite gradients
    themselves before they call this one; without ZeRO in fp32 this optimizer is DeepSpeed's and checks
    (one all-reduce of a flag per step, so that every rank decides alike under tensor parallelism)."""

    def __init__(self, params, check_finite: bool, **kwargs):
        super().__init__(params, **kwargs)
        self.check_finite = check_finite
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.check_finite:
            self.overflow = not all_gradients_finite(self)
            if self.overflow:
                return None
        return super().step(closure)


def muon_param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """Muon for the 2-D hidden matrices (the weights param_groups decays), AdamW without decay for embeddings,
    unembedding, norms and biases, as Keller Jordan's MuonWithAuxAdam example and the anchors split them. Each
    parameter is tagged `use_muon`, which DeepSpeed's ZeRO 1-2 read to orthogonalise a matrix's whole gradient
    before partitioning the update."""
    hidden, other = (group["params"] for group in param_groups(model, train.weight_decay))
    for param in hidden:
        param.use_muon = True
    for param in other:
        param.use_muon = False
    return [
        {"params": hidden, "use_muon": True, "lr": train.muon_lr, "momentum": train.muon_momentum,
         "weight_decay": train.weight_decay},
        {"params": other, "use_muon": False, "lr": train.lr, "betas": (train.beta1, train.beta2), "eps": 1e-8,
         "weight_decay": 0.0},
    ]


def skipping_muon_class():
    """DeepSpeed's MuonWithAuxAdam with SkippingAdamW's finite check (imported late: importing Muon compiles
    its kernels). The class name keeps "Muon", by which DeepSpeed's ZeRO recognises it."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    class SkippingMuonWithAuxAdam(MuonWithAuxAdam):
        def __init__(self, groups, check_finite: bool):
            super().__init__(groups)
            self.check_finite = check_finite
            self.overflow = False

        @torch.no_grad()
        def step(self, closure=None, step_id=None):
            if self.check_finite:
                self.overflow = not all_gradients_finite(self)
                if self.overflow:
                    return None
            return super().step(closure, step_id)

    return SkippingMuonWithAuxAdam


def build_optimizer(model: torch.nn.Module, train: TrainConfig, check_finite: bool = False) -> torch.optim.Optimizer:
    """AdamW over param_groups, or Muon with auxiliary AdamW (train.optimizer); check_finite: skip non-finite
    updates (see SkippingAdamW)."""
    if train.optimizer == "muon":
        return skipping_muon_class()(muon_param_groups(model, train), check_finite=check_finite)
    return SkippingAdamW(
        param_groups(model, train.weight_decay, train.lr),
        check_finite=check_finite,
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=1e-8,
        # One kernel per tensor, no temporaries: single-tensor AdamW on ZeRO's flat fp32 partition (the whole
        # rank's share in one tensor) allocated two more partitions for a moment (measured:
        # benchmarks/zero_memory.py).
        fused=True,
    )


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Factor on train.lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    floor = train.min_lr_ratio
    if train.schedule == "constant":
        return 1.0
    if train.schedule == "cosine":
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: stable at the peak, then a linear decay over the last decay_fraction of the steps.
    decay_start = wsd_decay_start(train.max_steps, train.decay_fraction)
    decay_steps = train.max_steps - decay_start
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))
