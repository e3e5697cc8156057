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


def test_the_loader_counts_epochs_over_a_single_data_set_and_after_a_resume():
    batches = RankBatches(ArrayWindows(40), seed=3, micro_batch=4, grad_accum=2, dp_size=1, dp_rank=0)
    assert batches.source_metrics(5) == {"data_epochs": 40 / 40}  # 5 steps of 8 windows: one pass
    assert batches.source_metrics(12)["data_epochs"] == 96 / 40
    batches.resume_at(10, 100)  # resumed with another history: counts continue from the samples consumed
    assert batches.source_metrics(12)["data_epochs"] == 116 / 40


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


class PartWindows:
    """One data set of a blend: window i of part p holds the tokens p*100000 + i*10 .. + 4."""

    window_length, dtype = 5, np.dtype(np.int64)

    def __init__(self, part: int, n: int):
        self.part, self.n = part, n

    def __len__(self) -> int:
        return self.n

    def windows(self, indices: np.ndarray) -> np.ndarray:
        return self.part * 100000 + indices[:, None] * 10 + np.arange(5)[None, :]


def blend_of(sizes, shares):
    from data_prep.blend import ConcatWindows

    return ConcatWindows([PartWindows(p, n) for p, n in enumerate(sizes)], [f"s{p}" for p in range(len(sizes))],
                         np.array(shares, dtype=np.float64))


def window_of(token: int) -> tuple[int, int]:
    part, rest = divmod(token, 100000)
    return part, rest // 10


def read_blend(dataset, steps, micro=8, accum=1, dp=1, start=0):
    """(part, window) of every sample that the ranks of one layout read at steps start..start+steps-1, in
    global sample order."""
    out = {}
    for rank in range(dp):
        batches = RankBatches(dataset, seed=11, micro_batch=micro, grad_accum=accum, dp_size=dp, dp_rank=rank)
        for step in range(start, start + steps):
            for m in range(accum):
                inputs, _ = batches.micro_batch_at(step, m)
                first = batches.first_sample(step, m)
                for j, token in enumerate(inputs[:, 0].tolist()):
                    out[first + j] = window_of(token)
    return [out[s] for s in sorted(out)]


def test_a_blend_draws_each_data_set_by_its_share_measured_from_the_windows_read():
    sizes, shares = (40, 700, 5000), (0.5, 0.3, 0.2)
    dataset = blend_of(sizes, shares)
    samples = read_blend(dataset, steps=400)  # 3200 samples
    parts = np.array([p for p, _ in samples])
    n = len(parts)
    for p, share in enumerate(shares):
        measured = float((parts == p).mean())
        assert abs(measured - share) < 4 * np.sqrt(share * (1 - share) / n), (p, measured)
    # The loader's own account (logged as data_share / data_epochs) is the count of what it read.
    batches = RankBatches(dataset, seed=11, micro_batch=8, grad_accum=1, dp_size=1, dp_rank=0)
    metrics = batches.source_metrics(400)
    for p in range(3):
        assert metrics[f"data_share.s{p}"] == float((parts == p).mean())
        assert metrics[f"data_epochs.s{p}"] == (parts == p).sum() / sizes[p]
    # The small data set repeats epoch after epoch, each epoch a permutation of its windows.
    small = [w for p, w in samples if p == 0]
    assert len(small) > 3 * sizes[0]
    for epoch in range(3):
        assert sorted(small[epoch * 40:(epoch + 1) * 40]) == list(range(40))


def test_a_blend_reads_the_same_windows_in_every_layout_and_after_a_resume():
    dataset = blend_of((30, 200), (0.25, 0.75))
    reference = read_blend(dataset, steps=6, micro=8)
    assert read_blend(dataset, steps=6, micro=4, dp=2) == reference
    assert read_blend(dataset, steps=6, micro=2, accum=2, dp=2) == reference
    assert read_blend(dataset, steps=3, micro=8, start=3) == reference[24:]  # resumed at step 3
    # An elastic resume: 3 steps of 8 samples, then a global batch of 16 from the 24 samples consumed.
    batches = RankBatches(dataset, seed=11, micro_batch=8, grad_accum=1, dp_size=2, dp_rank=1)
    batches.resume_at(3, 24)
    inputs, _ = batches.micro_batch_at(4, 0)  # samples 24 + 16 + 8 .. + 15
    assert [window_of(t) for t in inputs[:, 0].tolist()] == read_blend(dataset, steps=7, micro=8)[48:56]
    # Another seed, another order; the same seed, the same.
    other = RankBatches(dataset, seed=12, micro_batch=8, grad_accum=1, dp_size=1, dp_rank=0)
    assert [window_of(t) for t in other.micro_batch_at(0, 0)[0][:, 0].tolist()] != reference[:8]


def test_blend_order_is_exact_across_chunks_and_refuses_what_it_cannot_sample():
    import pytest

    from pipeline.data.loader import BlendOrder

    order = BlendOrder(np.array([10, 20, 30]), np.array([1.0, 1.0, 1.0]), ["a", "b", "c"], seed=1)
    edge = BlendOrder.CHUNK
    assert order.counts.sum() == edge and order.counts.tolist() == [21846, 21845, 21845]
    assert np.array_equal(order.indices(edge - 3, 6), np.concatenate([order.indices(edge - 3, 3), order.indices(edge, 3)]))
    whole = order.indices(edge - 50, 100)
    parts = np.searchsorted(order.offsets, whole, side="right") - 1
    assert order.seen(edge + 50).tolist() == (order.seen(edge - 50) + np.bincount(parts, minlength=3)).tolist()
    with pytest.raises(ValueError, match="b hold no training window"):
        BlendOrder(np.array([10, 0]), np.array([1.0, 1.0]), ["a", "b"], seed=1)
    with pytest.raises(ValueError, match="weights of b are under"):
        BlendOrder(np.array([10, 10]), np.array([1.0, 1e-7]), ["a", "b"], seed=1)


def test_a_blends_validation_windows_interleave_its_data_sets_in_proportion():
    from data_prep.blend import ConcatWindows

    val = ConcatWindows([PartWindows(0, 10), PartWindows(1, 30)], ["a", "b"], interleave=True)
    assert len(val) == 40
    parts = val.windows(np.arange(40))[:, 0] // 100000
    assert sorted(val.windows(np.arange(40))[:, 0].tolist()) == sorted(
        [i * 10 for i in range(10)] + [100000 + i * 10 for i in range(30)])  # every window once
    for prefix in (4, 8, 20):
        assert (parts[:prefix] == 0).sum() == prefix // 4
