"""Batches of (input, target) windows: the training order of one data-parallel rank (RankBatches), and
consecutive windows in file order for validation (window_batches).

One global, seeded order of windows per epoch; the position in it is the number of samples consumed.
Optimizer step k consumes samples [k*G, (k+1)*G) with G = micro_batch * grad_accum * dp; micro-step m of
rank r reads its micro_batch slice of that range. So dp=2 x b, dp=1 x 2b and accumulation 2 x b all see
the same samples at every step, and a resume at another data-parallel size continues exactly.

A blend (data_prep.blend) is sampled by BlendOrder: which data set the global sample s comes from, and which
of that data set's own seeded order of windows, are pure functions of s, so the same holds for blends.
"""

from __future__ import annotations

import hashlib
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


class BlendOrder:
    """Global seeded order of a blend's windows: sample s comes from data set d(s), as its k(s)-th sample in
    that data set's own WindowOrder (seeded by the data set's name, epoch after epoch).

    Samples go in chunks of CHUNK: every chunk holds exactly counts[d] samples of data set d (the shares
    times CHUNK, rounded by largest remainder, so the shares are met to 1/CHUNK), in a seeded shuffle of the
    chunk. So d(s) and k(s) = chunk * counts[d] + (earlier samples of d in the chunk) cost one shuffle per
    chunk, whatever s is: the order is deterministic, resumes at any sample, and does not depend on dp.
    """

    CHUNK = 1 << 16

    def __init__(self, lengths: np.ndarray, shares: np.ndarray, names: list[str], seed: int):
        lengths, shares = np.asarray(lengths, dtype=np.int64), np.asarray(shares, dtype=np.float64)
        empty = [n for n, length in zip(names, lengths, strict=True) if length == 0]
        if empty:
            raise ValueError(f"the blend's data sets {', '.join(empty)} hold no training window: remove them from "
                             f"data.mixture or give them more text")
        self.names, self.seed = names, seed
        self.counts = largest_remainder(shares / shares.sum(), self.CHUNK)
        if (self.counts == 0).any():
            small = [n for n, c in zip(names, self.counts, strict=True) if c == 0]
            raise ValueError(f"the weights of {', '.join(small)} are under 1/{self.CHUNK} of the blend's: raise "
                             f"them or remove those sources")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.orders = [WindowOrder(int(n), _name_seed(seed, name)) for n, name in zip(lengths, names, strict=True)]
        self._chunk, self._labels, self._rank = -1, None, None

    def _chunk_labels(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's data set per position, and each position's rank among the chunk's samples of its set."""
        if chunk != self._chunk:
            labels = np.repeat(np.arange(len(self.counts)), self.counts)
            labels = np.random.default_rng([self.seed, 0xB1E9D, chunk]).permutation(labels)
            rank = np.empty(self.CHUNK, dtype=np.int64)
            for d in range(len(self.counts)):
                where = np.flatnonzero(labels == d)
                rank[where] = np.arange(len(where))
            self._chunk, self._labels, self._rank = chunk, labels, rank
        return self._labels, self._rank

    def indices(self, first_sample: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i, sample in enumerate(range(first_sample, first_sample + count)):
            chunk, position = divmod(sample, self.CHUNK)
            labels, rank = self._chunk_labels(chunk)
            d = int(labels[position])
            k = chunk * int(self.counts[d]) + int(rank[position])
            out[i] = self.offsets[d] + self.orders[d].indices(k, 1)[0]
        return out

    def seen(self, samples: int) -> np.ndarray:
        """Samples drawn from each data set among the first `samples` of the order."""
        chunks, rest = divmod(samples, self.CHUNK)
        seen = chunks * self.counts
        if rest:
            labels, _ = self._chunk_labels(chunks)
            seen = seen + np.bincount(labels[:rest], minlength=len(self.counts))
        return seen


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to shares that sum to total (Hamilton's method; ties to the earlier index)."""
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    for i in np.argsort(-remainder, kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def order_for(dataset, seed: int) -> WindowOrder | BlendOrder:
    """A blend's training split (it carries its shares) is sampled by them; any other split is one data set."""
    shares = getattr(dataset, "shares", None)
    if shares is not None:
        return BlendOrder(dataset.lengths, shares, dataset.names, seed)
    return WindowOrder(len(dataset), seed)


class RankBatches:
    """The micro-batches that one data-parallel rank trains on."""

    def __init__(self, dataset: WindowDataset, seed: int, micro_batch: int, grad_accum: int, dp_size: int, dp_rank: int):
        self.dataset = dataset
        self.order = order_for(dataset, seed)
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

    def source_metrics(self, step: int) -> dict[str, float]:
        """Epochs (passes over the training windows) up to `step`: `data_epochs` for a single data set; for a
        blend each data set's share of the samples consumed and its epochs. A scaling sweep records the last
        value with each point (repeated data is what the data-constrained fit models)."""
        samples = self.samples_consumed(step)
        if not isinstance(self.order, BlendOrder):
            return {"data_epochs": samples / self.order.n_windows}
        seen = self.order.seen(samples)
        metrics = {}
        for name, n, order in zip(self.order.names, seen, self.order.orders, strict=True):
            metrics[f"data_share.{name}"] = float(n) / max(samples, 1)
            metrics[f"data_epochs.{name}"] = float(n) / order.n_windows
        return metrics

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
