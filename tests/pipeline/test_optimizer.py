from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train.optimizer import lr_multiplier, param_groups


def test_warmup_then_cosine_to_the_floor():
    train = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, train) == pytest.approx(0.1)
    assert lr_multiplier(9, train) == pytest.approx(1.0)
    assert lr_multiplier(10, train) == pytest.approx(1.0)
    assert lr_multiplier(55, train) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, train) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    train = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(50, train) == 1.0
    assert lr_multiplier(79, train) == 1.0
    assert lr_multiplier(90, train) == pytest.approx(0.5)
    assert lr_multiplier(100, train) == pytest.approx(0.0)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = torch.nn.ModuleDict({
        "tok_emb": torch.nn.Embedding(10, 4),
        "proj": torch.nn.Linear(4, 4),
        "norm": torch.nn.LayerNorm(4),
    })
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_on_the_real_model_covers_exactly_its_projections(tie):
    from pipeline.config import ModelConfig
    from pipeline.model.gpt import GPT

    model = GPT(ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=16, norm="rmsnorm",
                            pos_encoding="learned", tie_embeddings=tie))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == sorted(f"blocks.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                       "mlp.up_proj", "mlp.down_proj"))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
