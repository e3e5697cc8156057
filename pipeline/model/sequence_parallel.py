"""Ulysses sequence parallelism (Jacobs et al. 2023) on DeepSpeed's machinery: what a GPT needs to train one
slice of each window on each rank of a sequence-parallel group.

    group of N ranks, one window of T positions (every rank gets the whole window's token ids):
      rank r embeds and runs every layer on positions [r T/N, (r+1) T/N)
      attention: q, k, v (B, T/N, H, d) --all-to-all--> (B, T, H/N, d) attention over the whole window on the
                 heads [r H/N, (r+1) H/N) --all-to-all--> (B, T/N, H, d)     (DeepSpeed's DistributedAttention)
      loss: the rank's targets' share of the window's mean (the value every rank reports is the whole window's)

Masks and positions come from the whole window's token ids, so document masking and each document's positions
(learned, sinusoidal, RoPE: counted from the document's start; ALiBi: the slopes of the rank's heads) are the
same as on one rank: a document that crosses a slice boundary is attended over whole. Grouped-query attention
works when N divides the key/value heads: a rank receives the key/value heads of its query heads.

The gradients: DeepSpeed's engine and ZeRO sum them over the sequence-parallel group and average over the
data-parallel ranks (their reductions divide by world / N), so each rank's loss is its part of the window's
mean, and the parts add up to the loss one rank would compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["SequenceShard", "sequence_shard"]


class SequenceShard:
    """One rank's place in a sequence-parallel group: its slice of the positions and its heads, the all-to-all
    around attention, and sums over the group."""

    def __init__(self, group, rank: int, size: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.group, self.rank, self.size = group, rank, size
        # Batch-first (B, T, H, d): scatter the heads (dim 2), gather the positions (dim 1).
        self._exchange = DistributedAttention(_call, group, scatter_idx=2, gather_idx=1)

    def positions(self, length: int) -> slice:
        """This rank's slice of a window of `length` positions."""
        part = length // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def heads(self, n_head: int) -> slice:
        """The heads this rank attends with after the exchange."""
        part = n_head // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """attention over the whole window for this rank's heads: q (B, T/N, H, d), k and v (B, T/N, H_kv, d) in,
        attention called with (B, T, H/N, d) and (B, T, H_kv/N, d), its (B, T, H/N, d) back as (B, T/N, H, d)."""
        return self._exchange(q, k, v, 0, None, attention)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the group (no gradient flows through it)."""
        summed = value.detach().clone()
        dist.all_reduce(summed, group=self.group)
        return summed

    def window_mean(self, local_mean: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
        """The window's mean from this rank's mean over its local_count positions: the value is the whole
        window's (the same on every rank of the group), the gradient this rank's share (local_count / count of
        the group), which DeepSpeed's reduction adds up over the group."""
        share = local_mean * (local_count.to(local_mean.dtype) / self.total(local_count).clamp(min=1).to(local_mean.dtype))
        return share + (self.total(share) - share.detach())


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor:
    return attention(q, k, v)


def sequence_shard(size: int) -> SequenceShard | None:
    """This rank's SequenceShard in DeepSpeed's sequence-parallel groups (made by
    pipeline.train.distributed.sequence_parallel_groups), None without sequence parallelism."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    group = parallel_state_sp.get_sequence_parallel_group()
    return SequenceShard(group, dist.get_rank(group), size)
