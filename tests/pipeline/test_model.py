"""The GPT model: shapes, causality, the options, the KV cache, and pinned numbers."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.generation import filter_logits, generate
from pipeline.model import GPT
from pipeline.model_size import count_parameters, training_flops_per_token

OPTIONS = list(itertools.product(["learned", "sinusoidal", "rotary"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]))


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=101, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=None)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("pos,norm,act", OPTIONS)
@pytest.mark.parametrize("bias,tied", [(True, True), (False, False)])
def test_parameter_count_matches_the_module(pos, norm, act, bias, tied):
    cfg = small(pos_encoding=pos, norm=norm, activation=act, bias=bias, tie_embeddings=tied)
    model = GPT(cfg)
    assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("pos,norm,act", OPTIONS)
def test_future_tokens_do_not_change_past_logits(pos, norm, act):
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos, norm=norm, activation=act)).eval()
    x = torch.randint(0, 101, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 101, (2, 4))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_loss_is_mean_cross_entropy_and_starts_near_log_vocab():
    torch.manual_seed(0)
    model = GPT(small())
    x = torch.randint(0, 101, (4, 16))
    y = torch.randint(0, 101, (4, 16))
    logits, loss = model(x, y)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), y.reshape(-1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.2


def test_pinned_first_loss():
    """Catches silent changes in initialisation or the forward math."""
    torch.manual_seed(0)
    model = GPT(small(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", tie_embeddings=False))
    torch.manual_seed(1)
    x = torch.randint(0, 101, (2, 16))
    _, loss = model(x[:, :-1], x[:, 1:])
    assert loss.item() == pytest.approx(PINNED_LOSS, abs=1e-5)


PINNED_LOSS = 4.642530


def test_tied_embedding_shares_storage():
    model = GPT(small(tie_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_residual_projections_are_scaled_by_depth():
    torch.manual_seed(0)
    cfg = small(n_layer=8, d_model=128, init_std=0.02)
    model = GPT(cfg)
    q_std = model.blocks[0].attn.q_proj.weight.std().item()
    o_std = model.blocks[0].attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4, rel=0.05)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(small())
    x = torch.randint(0, 101, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_activation_checkpointing(True)
    _, loss = model(x, x)
    loss.backward()
    for g, p in zip(expected, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_greedy_generation_with_cache_equals_without(pos):
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos, context_length=32)).eval()
    prompt = [5, 7, 11]
    with_cache = generate(model, prompt, 25, temperature=0, use_cache=True)
    without = generate(model, prompt, 25, temperature=0, use_cache=False)
    assert with_cache == without
    assert len(with_cache) == 25


def test_top_k_one_is_greedy_and_sampling_is_seeded():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    greedy = generate(model, [1, 2], 10, temperature=0)
    assert generate(model, [1, 2], 10, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, [1, 2], 10, temperature=1.0, seed=3) == generate(model, [1, 2], 10, temperature=1.0, seed=3)


def test_generation_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    first = generate(model, [1, 2], 1, temperature=0)[0]
    assert generate(model, [1, 2], 10, temperature=0, eos_id=first) == [first]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept.tolist() == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_k=3)).tolist() == [True, True, True, False]


def test_flops_per_token_follows_6n_plus_attention():
    cfg = small(tie_embeddings=True)
    p = count_parameters(cfg)
    expected = 6 * (p.attention + p.mlp + 101 * 32) + 12 * 2 * 32 * 16
    assert training_flops_per_token(cfg) == expected
