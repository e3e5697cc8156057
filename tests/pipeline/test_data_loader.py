"""The data-parallel split: every layout of the same global batch reads the same windows."""

from __future__ import annotations

import numpy as np

from pipeline.data.loader import RankBatches, WindowOrder


class ArrayWindows:
    """Stands in for data_prep.shards.WindowDataset: window i holds the tokens i*10 .. i*10+4."""

    window_length = 5

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def windows(self, indices: np.ndarray) -> np.ndarray:
        return (indices[:, None] * 10 + np.arange(5)[None, :]).astype(np.uint16)


def step_samples(n_windows: int, micro: int, accum: int, dp: int, step: int) -> list[int]:
    seen = []
    for rank in range(dp):
        batches = RankBatches(ArrayWindows(n_windows), seed=3, micro_batch=micro, grad_accum=accum, dp_size=dp, dp_rank=rank)
        for m in range(accum):
            inputs, targets = batches.micro_batch_at(step, m)
            seen.extend((inputs[:, 0] // 10).tolist())
            assert (targets[:, :-1] == inputs[:, 1:]).all()
    return sorted(seen)


def test_layouts_of_one_global_batch_read_the_same_windows():
    for step in (0, 1, 7):
        reference = step_samples(50, micro=4, accum=1, dp=1, step=step)
        assert step_samples(50, micro=2, accum=1, dp=2, step=step) == reference
        assert step_samples(50, micro=2, accum=2, dp=1, step=step) == reference
        assert step_samples(50, micro=1, accum=2, dp=2, step=step) == reference


def test_ranks_read_disjoint_windows_within_an_epoch():
    first = step_samples(64, micro=4, accum=2, dp=2, step=0)
    assert len(set(first)) == len(first) == 16


def test_order_is_a_seeded_permutation_per_epoch():
    order = WindowOrder(10, seed=5)
    epoch0 = order.indices(0, 10)
    epoch1 = order.indices(10, 10)
    assert sorted(epoch0.tolist()) == list(range(10))
    assert sorted(epoch1.tolist()) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(WindowOrder(10, seed=5).indices(3, 12), np.concatenate([epoch0[3:], epoch1[:5]]))


def test_prefetching_reads_exactly_what_a_plain_read_does():
    """With a device the next micro-batch is read ahead on a thread; retries (the same step again) and a resume
    at another position still get exactly the windows of a plain read."""
    import torch

    plain = RankBatches(ArrayWindows(40), seed=3, micro_batch=2, grad_accum=2, dp_size=2, dp_rank=1)
    ahead = RankBatches(ArrayWindows(40), seed=3, micro_batch=2, grad_accum=2, dp_size=2, dp_rank=1)
    cpu = torch.device("cpu")
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1), (2, 0), (5, 1), (6, 0)]
    try:
        for step, micro in keys:
            assert all(torch.equal(a, b) for a, b in zip(ahead.micro_batch_at(step, micro, cpu),
                                                         plain.micro_batch_at(step, micro), strict=True))
        plain.resume_at(7, 123)
        ahead.resume_at(7, 123)
        for step, micro in [(7, 0), (7, 1), (8, 0)]:
            assert all(torch.equal(a, b) for a, b in zip(ahead.micro_batch_at(step, micro, cpu),
                                                         plain.micro_batch_at(step, micro), strict=True))
        assert ahead._ahead[0] == (8, 1)  # the next one is on its way
    finally:
        ahead.close()
    assert ahead._pool is None
