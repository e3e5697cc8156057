"""Batches of (input, target) windows: the training order of one data-parallel rank (RankBatches), and
consecutive windows in file order for validation (window_batches).

One global, seeded order of windows per epoch; the position in it is the number of samples consumed.
Optimizer step k consumes samples [k*G, (k+1)*G) with G = micro_batch * grad_accum * dp; micro-step m of
rank r reads its micro_batch slice of that range. So dp=2 x b, dp=1 x 2b and accumulation 2 x b all see
the same samples at every step, and a resume at another data-parallel size continues exactly.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from data_prep.shards import WindowDataset


class WindowOrder:
    """Global seeded permutation of window indices, epoch after epoch."""

    def __init__(self, n_windows: int, seed: int):
        if n_windows <= 0:
            raise ValueError("the training split holds no windows: prepare more data or shorten the context")
        self.n_windows = n_windows
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return self._perm

    def indices(self, first_sample: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i, sample in enumerate(range(first_sample, first_sample + count)):
            epoch, position = divmod(sample, self.n_windows)
            out[i] = self._permutation(epoch)[position]
        return out


class RankBatches:
    """The micro-batches that one data-parallel rank trains on."""

    def __init__(self, dataset: WindowDataset, seed: int, micro_batch: int, grad_accum: int, dp_size: int, dp_rank: int):
        self.dataset = dataset
        self.order = WindowOrder(len(dataset), seed)
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        # Where the order stands at `base_step`: a resume (possibly with another global batch) sets both.
        self.base_step = 0
        self.base_samples = 0
        self._pool: ThreadPoolExecutor | None = None
        self._ahead = None  # ((step, micro_step), Future) of the micro-batch read ahead

    def resume_at(self, step: int, samples_consumed: int) -> None:
        self.base_step, self.base_samples = step, samples_consumed
        if self._ahead is not None:  # read under the old position
            self._ahead[1].cancel()
            self._ahead = None

    def samples_consumed(self, step: int) -> int:
        return self.base_samples + (step - self.base_step) * self.global_batch

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    def first_sample(self, step: int, micro_step: int) -> int:
        return self.samples_consumed(step) + (micro_step * self.dp_size + self.dp_rank) * self.micro_batch

    def read(self, step: int, micro_step: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's (inputs, targets) in host memory (pinned for an asynchronous copy with pin)."""
        windows = self.dataset.windows(self.order.indices(self.first_sample(step, micro_step), self.micro_batch))
        tokens = torch.from_numpy(windows.astype(np.int64, copy=False))
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        return (inputs.pin_memory(), targets.pin_memory()) if pin else (inputs, targets)

    def next_key(self, step: int, micro_step: int) -> tuple[int, int]:
        return (step, micro_step + 1) if micro_step + 1 < self.grad_accum else (step + 1, 0)

    def micro_batch_at(self, step: int, micro_step: int,
                       device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch on `device`. With a device, the following micro-batch is read meanwhile on a
        background thread (gathered from the memory-mapped shards, pinned on a GPU), so the step does not wait
        for it; a request for another one (a retried step, a resume) is read when asked. The order is a pure
        function of (step, micro_step): prefetching changes no byte of what is trained on."""
        if device is None:
            return self.read(step, micro_step)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        pin = device.type == "cuda"
        key, future = self._ahead if self._ahead is not None else (None, None)
        if key != (step, micro_step):
            # Only the prefetch thread reads, so the permutation cache is never shared between threads.
            future = self._pool.submit(self.read, step, micro_step, pin)
        inputs, targets = future.result()
        nxt = self.next_key(step, micro_step)
        self._ahead = (nxt, self._pool.submit(self.read, *nxt, pin))
        return inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None


def window_batches(dataset, batch_size: int, max_tokens: int | None):
    """Consecutive validation windows, in order, up to a token budget."""
    n = len(dataset)
    if max_tokens is not None:
        n = min(n, max(1, math.ceil(max_tokens / (dataset.window_length - 1))))
    for start in range(0, n, batch_size):
        windows = dataset.windows(np.arange(start, min(n, start + batch_size)))
        tokens = torch.from_numpy(windows.astype(np.int64, copy=False))
        yield tokens[:, :-1], tokens[:, 1:]
