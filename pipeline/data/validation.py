"""Scoring prepared windows: validation loss totals (nats, tokens, bytes for bits per byte), sharded over the
data-parallel ranks of a training job or run in one process, and the unigram baseline from prepare's token
counts. Used by the training workers (pipeline.train) and the evaluate stage (pipeline.evaluation) alike.

Validation on the training workers: each data-parallel rank scores its slice of the validation windows with
the training layout (tensor parallelism, ZeRO stage, precision, device), and the sums are reduced exactly.

    windows 0 .. n-1 (n from the token budget, as pipeline evaluate counts it)
    data-parallel rank r of d takes windows r, r + d, r + 2d, ...   (tensor- and sequence-parallel ranks of a
                                                                     group alike; a sequence-parallel rank
                                                                     scores the targets of its slice)
    every rank runs the same number of micro-batches, a short slice padded with a window whose targets are
    ignored, because ZeRO-3 and AutoTP need every rank in every forward
    totals = all-reduce of (summed nats, tokens, bytes) over all ranks, in float64, divided by the tensor-parallel
             degree (the ranks of a tensor-parallel group score the same windows and hold the same sums; those
             of a sequence-parallel group hold the sums of their slices, which add up to the windows')

So the loss is the sum of the per-token losses over the sum of the tokens (not a mean of means), and the same
number at any layout up to float reordering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_prep.blend import component_dirs, is_blend
from data_prep.shards import WindowDataset, load_manifest
from pipeline.data.loader import window_batches


@dataclass
class LossTotals:
    nats: float
    tokens: int
    bytes: int

    @property
    def mean_loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(1, self.bytes)


def validation_windows(n_windows: int, window_length: int, max_tokens: int | None) -> int:
    """How many validation windows the budget covers (all of them when max_tokens is None)."""
    if max_tokens is None:
        return n_windows
    return min(n_windows, max(1, math.ceil(max_tokens / (window_length - 1))))


def rank_slices(n: int, dp_size: int, dp_rank: int, micro_batch: int) -> list[np.ndarray]:
    """This rank's windows as micro-batches of indices, -1 where a short slice is padded; the same number of
    micro-batches on every rank."""
    mine = np.arange(dp_rank, n, dp_size)
    steps = max(1, math.ceil(math.ceil(n / dp_size) / micro_batch))
    padded = np.full(steps * micro_batch, -1, dtype=np.int64)
    padded[: len(mine)] = mine
    return list(padded.reshape(steps, micro_batch))


@torch.no_grad()
def sharded_validation_totals(module, dataset, micro_batch: int, max_tokens: int | None, byte_lengths: np.ndarray,
                              device: torch.device, dp_size: int = 1, dp_rank: int = 0, tp: int = 1) -> LossTotals:
    """The validation totals over the budget's windows, this rank scoring its slice; module(inputs) returns
    (logits, _) (a DeepSpeed engine or the model). On more than one rank (dp_size x tp, or a sequence-parallel
    group) every rank must call it (a collective). The module's training mode is restored afterwards."""
    was_training = module.training
    model = getattr(module, "module", module)  # the GPT inside a DeepSpeed engine
    module.eval()
    n = validation_windows(len(dataset), dataset.window_length, max_tokens)
    lengths = torch.from_numpy(np.asarray(byte_lengths, dtype=np.int64))
    sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    try:
        for indices in rank_slices(n, dp_size, dp_rank, micro_batch):
            real = indices >= 0
            windows = torch.from_numpy(dataset.windows(np.where(real, indices, 0)).astype(np.int64, copy=False))
            inputs, targets = windows[:, :-1], windows[:, 1:].clone()
            targets[torch.from_numpy(~real)] = -100
            logits, _ = module(inputs.to(device))
            targets = model.local_targets(targets)  # this rank's slice of the positions under sequence parallelism
            nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.to(device).reshape(-1),
                                   ignore_index=-100, reduction="sum")
            kept = targets[targets != -100]
            sums += torch.tensor([float(nats), kept.numel(), float(lengths[kept].sum())], dtype=torch.float64)
    finally:
        module.train(was_training)
    if dp_size * tp > 1 or model.sequence_shard is not None:
        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu() / tp
    return LossTotals(float(sums[0]), int(sums[1]), int(sums[2]))


def unigram_totals(train_counts: np.ndarray, dataset, max_tokens: int | None, byte_lengths: np.ndarray) -> LossTotals:
    """Loss of a unigram model (add-one smoothed training-token frequencies) on the same validation targets:
    the baseline a model that learned nothing about context would reach."""
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + len(train_counts))
    nats, tokens, nbytes = 0.0, 0, 0
    for _, targets in window_batches(dataset, 256, max_tokens):
        t = targets.numpy().reshape(-1)
        nats -= float(log_probs[t].sum())
        tokens += t.size
        nbytes += int(byte_lengths[t].sum())
    return LossTotals(nats, tokens, nbytes)


def token_counts(dataset, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(dataset), 4096):
        windows = dataset.windows(np.arange(start, min(len(dataset), start + 4096)))
        counts += np.bincount(windows[:, 1:].reshape(-1), minlength=vocab_size)[:vocab_size]
    return counts


def train_token_counts(data_dir: Path, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the training split: counted by prepare (manifest.token_counts), or, for
    a data set prepared before it counted them, by reading the split's windows. A blend's: its data sets'
    counts summed (the unigram of its validation windows, which hold every data set in its own proportion)."""
    if is_blend(data_dir):
        return sum(train_token_counts(d, vocab_size) for d in component_dirs(data_dir))
    manifest = load_manifest(data_dir)
    if not manifest.token_counts:
        return token_counts(WindowDataset(data_dir, "train"), vocab_size)
    counts = np.load(Path(data_dir) / manifest.token_counts["file"])
    return np.pad(counts, (0, max(0, vocab_size - len(counts))))[:vocab_size]
