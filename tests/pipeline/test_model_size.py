"""Parameter counts: equal to the instantiated module for every option, and to the published figures."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import ModelConfig, validate_model
from pipeline.model.size import count_parameters, format_breakdown, training_flops_per_token

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
OPTIONS = list(itertools.product(["learned", "sinusoidal", "rotary"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]))


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=101, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=None)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("pos,norm,act", OPTIONS)
@pytest.mark.parametrize("bias,tied", [(True, True), (False, False), (True, False), (False, True)])
def test_parameter_count_matches_the_module(pos, norm, act, bias, tied):
    from pipeline.model.gpt import GPT

    cfg = small(pos_encoding=pos, norm=norm, activation=act, bias=bias, tie_embeddings=tied)
    model = GPT(cfg)
    params = dict(model.named_parameters())  # a tied lm_head.weight is listed once
    p = count_parameters(cfg)
    assert p.total == sum(t.numel() for t in params.values())
    assert p.embedding == params["tok_emb.weight"].numel()
    assert p.unembedding == (0 if tied else params["lm_head.weight"].numel())
    assert p.positional == (params["pos_emb.weight"].numel() if pos == "learned" else 0)
    assert p.biases == sum(t.numel() for n, t in params.items() if n.endswith("proj.bias"))
    assert p.norms == sum(t.numel() for n, t in params.items() if "norm" in n)
    assert p.attention == sum(t.numel() for n, t in params.items() if re.search(r"attn\.[qkvo]_proj\.weight", n))
    assert p.mlp == sum(t.numel() for n, t in params.items() if re.search(r"mlp\.\w+_proj\.weight", n))


def test_counting_175b_is_instant():
    start = time.perf_counter()
    count_parameters(load_model("gpt3_175b"))
    assert time.perf_counter() - start < 0.1


def test_flops_per_token_is_palms_6n_plus_attention():
    cfg = small(tie_embeddings=True)
    p = count_parameters(cfg)
    # N: attention and MLP matrices plus the logits' vocab x d_model product (tied or not).
    assert training_flops_per_token(cfg) == 6 * (p.attention + p.mlp + 101 * 32) + 12 * 2 * 32 * 16
    assert training_flops_per_token(cfg) == training_flops_per_token(small(tie_embeddings=False))


def test_format_breakdown_lists_every_component():
    text = format_breakdown(small(activation="swiglu", pos_encoding="rotary"))
    for label in ("W_Q", "W_O", "MLP gate", "positional", "biases", "norm", "total", "non-embedding", "FLOPs"):
        assert label in text


def load_model(name: str) -> ModelConfig:
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    return OmegaConf.to_object(node)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_is_valid_and_named_after_its_file(path):
    cfg = load_model(path.stem)
    validate_model(cfg)
    assert cfg.name == path.stem


def test_gpt3_175b_matches_the_design_figures():
    p = count_parameters(load_model("gpt3_175b"))
    assert p.embedding == 617_558_016
    assert p.unembedding == 617_558_016
    assert p.attention_qo_each == p.attention_kv_each == 14_495_514_624
    assert p.mlp_matrices_each == 57_982_058_496
    assert p.n_mlp_matrices == 2
    assert p.weight_matrices == 175_181_291_520
    # Reported separately: learned positions, biases (4d + d_ff + d per layer), LayerNorm weights and biases.
    assert p.positional == 2048 * 12288
    assert p.biases == 96 * (4 * 12288 + 49152 + 12288)
    assert p.norms == (2 * 96 + 1) * 2 * 12288


def test_gpt2_small_has_124m_parameters():
    assert count_parameters(load_model("gpt2_small")).total == 124_439_808


@pytest.mark.parametrize("name,billions", [("gpt3_125m", 0.125), ("gpt3_350m", 0.35), ("gpt3_760m", 0.76),
                                           ("gpt3_1_3b", 1.3), ("gpt3_2_7b", 2.7), ("gpt3_6_7b", 6.7),
                                           ("gpt3_13b", 13.0), ("gpt3_175b", 175.0)])
def test_gpt3_family_sizes_match_the_paper(name, billions):
    """Table 2.1's sizes count one embedding matrix besides the transformer's matrices (within 3%)."""
    p = count_parameters(load_model(name))
    assert p.weight_matrices - p.unembedding == pytest.approx(billions * 1e9, rel=0.03)


def test_params_command_prints_the_breakdown():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "params", "model=gpt3_175b"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "175,181,291,520" in proc.stdout
    assert "14,495,514,624" in proc.stdout and "57,982,058,496" in proc.stdout
    assert "biases" in proc.stdout and "positional" in proc.stdout
