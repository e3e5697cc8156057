"""Sampling: the cache changes no token, greedy and top-k=1 agree, top-p keeps the smallest nucleus, EOS
stops, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.generation import filter_logits, generate, generate_batch
from pipeline.model.gpt import GPT


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=61, context_length=16, n_layer=2, n_head=2, d_model=32)
    return GPT(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("pos", ["learned", "rotary", "sinusoidal"])
def test_greedy_with_cache_equals_without_even_past_the_context(pos):
    model = tiny_model(pos_encoding=pos)
    prompt = [5, 7, 11]
    with_cache = generate(model, prompt, 30, temperature=0, use_cache=True)  # 33 tokens > context 16
    without = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert len(with_cache) == 30
    assert with_cache == without


def test_a_prompt_longer_than_the_context_keeps_its_last_window():
    model = tiny_model()
    prompt = list(range(40))
    assert generate(model, prompt, 5, temperature=0) == generate(model, prompt[-16:], 5, temperature=0)


def test_top_k_one_is_greedy():
    model = tiny_model()
    greedy = generate(model, [1, 2], 10, temperature=0)
    assert generate(model, [1, 2], 10, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, [1, 2], 10, temperature=5.0, top_k=1, seed=4, use_cache=False) == greedy


def test_sampling_is_reproducible_for_a_seed():
    model = tiny_model()
    a = generate(model, [1, 2], 20, temperature=1.0, seed=3)
    assert a == generate(model, [1, 2], 20, temperature=1.0, seed=3)
    assert a == generate(model, [1, 2], 20, temperature=1.0, seed=3, use_cache=False)
    assert a != generate(model, [1, 2], 20, temperature=1.0, seed=4)


def test_generation_stops_at_eos_and_returns_only_new_tokens():
    model = tiny_model()
    first = generate(model, [1, 2], 1, temperature=0)
    assert len(first) == 1
    assert generate(model, [1, 2], 10, temperature=0, eos_id=first[0]) == first
    assert generate(model, [1, 2], 0, temperature=0) == []


def test_generation_uses_eval_mode_and_restores_the_mode():
    model = tiny_model(dropout=0.5).train()
    assert generate(model, [1, 2], 8, temperature=0) == generate(model, [1, 2], 8, temperature=0)
    assert model.training


def test_empty_prompt_starts_from_eos_or_is_an_error():
    model = tiny_model()
    assert generate(model, [], 3, temperature=0, eos_id=60) == generate(model, [60], 3, temperature=0, eos_id=60)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)


def kept(logits: torch.Tensor) -> list[bool]:
    return torch.isfinite(logits).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))  # sorted: 0.5, 0.3, 0.15, 0.05
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.75)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, False, True]
    assert kept(filter_logits(logits, top_p=0.99)) == [True, True, True, True]
    assert kept(filter_logits(logits, top_p=1.0)) == [True, True, True, True]
    assert torch.equal(filter_logits(logits, top_p=0.75)[[1, 3]], logits[[1, 3]])  # kept logits unchanged


def test_top_k_then_top_p():
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    assert kept(filter_logits(logits, top_k=3)) == [True, True, False, True]
    assert kept(filter_logits(logits, top_k=1)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_k=0)) == [True, True, True, True]
    # After top-k=2 the renormalised probabilities are 0.625 and 0.375: top-p 0.6 keeps only the first.
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == [False, True, False, False]
    # Rows of a batch are filtered independently.
    batch = torch.stack([logits, logits.flip(0)])
    assert kept(filter_logits(batch, top_k=1)) == [[False, True, False, False], [False, False, True, False]]


def test_bad_sampling_arguments_are_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 2, top_p=0.0)


@pytest.mark.parametrize("options", [dict(), dict(pos_encoding="rotary", n_kv_head=1, document_mask=True, eos_id=3)])
def test_batched_greedy_generation_equals_one_prompt_at_a_time_even_past_the_context(options):
    """Prompts of different lengths (batched by length) and several samples each, one preallocated cache per
    batch: greedy rows equal generate() of each prompt alone, also past the 16-position context."""
    model = tiny_model(**options)
    prompts = [[5, 7, 11], [2, 9, 4, 8, 1], [6, 6, 6], [8]]
    batched = generate_batch(model, prompts, 25, num_samples=2, temperature=0)
    for prompt, samples in zip(prompts, batched, strict=True):
        expected = generate(model, prompt, 25, temperature=0)
        assert samples == [expected, expected]


def test_batched_sampling_is_reproducible_and_rows_differ():
    model = tiny_model()
    (a,) = generate_batch(model, [[1, 2]], 20, num_samples=4, temperature=1.0, seed=3)
    assert len(a) == 4 and len({tuple(row) for row in a}) > 1  # the samples are drawn independently
    assert generate_batch(model, [[1, 2]], 20, num_samples=4, temperature=1.0, seed=3) == [a]
    assert generate_batch(model, [[1, 2]], 20, num_samples=4, temperature=1.0, seed=4) != [a]


def test_batched_rows_stop_at_their_own_eos():
    model = tiny_model()
    (rows,) = generate_batch(model, [[1, 2]], 30, num_samples=6, temperature=2.0, seed=0)
    eos = rows[0][2]  # a token that row 0 sampled third: stop there
    (cut,) = generate_batch(model, [[1, 2]], 30, num_samples=6, temperature=2.0, seed=0, eos_id=eos)
    for full, short in zip(rows, cut, strict=True):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert short == full[:end]


def test_the_cache_is_allocated_once_for_the_context():
    model = tiny_model(n_kv_head=1)
    cache = model.new_kv_cache()
    model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    buffer = cache[0].k_buffer
    for t in range(3, 16):
        model(torch.tensor([[4]]), kv_cache=cache, start_pos=t)
    assert cache[0].k_buffer is buffer and buffer.shape == (1, 1, 16, 16) and cache[0].length == 16
