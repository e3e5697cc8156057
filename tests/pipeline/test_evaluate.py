"""Validation metrics against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_prep.shards import WindowDataset, write_synthetic_dataset
from pipeline.config import ModelConfig
from pipeline.data.validation import token_counts, unigram_totals
from pipeline.evaluation.evaluate import validation_totals
from pipeline.model.gpt import GPT


@pytest.fixture
def val_data(tmp_path):
    windows = np.random.default_rng(1).integers(0, 50, size=(23, 9))
    root = write_synthetic_dataset(tmp_path / "d", windows, vocab_size=50, val_windows=11)
    return root, windows


def test_perplexity_is_exp_of_the_mean_token_loss(val_data):
    root, windows = val_data
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, d_model=16)).eval()
    byte_lengths = np.arange(50) % 4
    totals = validation_totals(model, WindowDataset(root, "validation"), batch_size=4, max_tokens=None,
                               byte_lengths=byte_lengths)
    # Independent: one window at a time, log-softmax by hand.
    losses, nbytes = [], 0
    with torch.no_grad():
        for w in windows[:11]:
            logits, _ = model(torch.tensor(w[None, :-1]))
            logp = logits[0] - torch.logsumexp(logits[0], dim=-1, keepdim=True)
            losses += [-logp[i, t].item() for i, t in enumerate(w[1:])]
            nbytes += int(byte_lengths[w[1:]].sum())
    assert totals.tokens == len(losses) == 11 * 8
    assert totals.mean_loss == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert totals.perplexity == pytest.approx(math.exp(float(np.mean(losses))), rel=1e-5)
    assert totals.bits_per_byte == pytest.approx(sum(losses) / math.log(2) / nbytes, rel=1e-5)


def test_token_budget_limits_the_windows_scored(val_data):
    root, _ = val_data
    model = GPT(ModelConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, d_model=16)).eval()
    totals = validation_totals(model, WindowDataset(root, "validation"), 4, 20, np.ones(50, dtype=np.int64))
    assert totals.tokens == 3 * 8  # ceil(20 / 8) windows


def test_unigram_baseline_uses_smoothed_training_frequencies(val_data):
    root, windows = val_data
    counts = token_counts(WindowDataset(root, "train"), 50)
    assert counts.sum() == 12 * 8
    expected_counts = np.bincount(windows[11:, 1:].reshape(-1), minlength=50)
    assert np.array_equal(counts, expected_counts)
    totals = unigram_totals(counts, WindowDataset(root, "validation"), None, np.ones(50, dtype=np.int64))
    p = (expected_counts + 1) / (expected_counts.sum() + 50)
    manual = -np.mean(np.log(p[windows[:11, 1:].reshape(-1)]))
    assert totals.mean_loss == pytest.approx(manual, rel=1e-9)
