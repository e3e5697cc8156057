"""The GPT model: names, causality, every option, initialisation, the KV cache, tensor-parallel shards and
pinned numbers."""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn as nn

from pipeline.config import ModelConfig, mlp_width
from pipeline.model.gpt import GPT
from pipeline.model.tensor_parallel import AUTOTP_LAYER_SPECS

OPTIONS = list(itertools.product(["learned", "sinusoidal", "rotary"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"]))
VOCAB = 101


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=None)
    return ModelConfig(**{**base, **kw})


def test_missing_vocab_size_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(small(vocab_size=None))


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_module_names_are_the_autotp_contract(act):
    model = GPT(small(activation=act, pos_encoding="learned", tie_embeddings=False))
    names = {name for name, _ in model.named_parameters()}
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"blocks.{i}.attn_norm.weight", f"blocks.{i}.mlp_norm.weight"}
        expected |= {f"blocks.{i}.attn.{m}_proj.weight" for m in "qkvo"}
        expected |= {f"blocks.{i}.mlp.{m}_proj.weight" for m in (["up", "gate", "down"] if act == "swiglu" else ["up", "down"])}
    assert expected <= names
    # The AutoTP specs the DeepSpeed config ships pick these weights: o/down by rows, the rest by columns.
    def matched(kind: str) -> set[str]:
        patterns = [p for spec in AUTOTP_LAYER_SPECS if spec["partition_type"] == kind for p in spec["patterns"]]
        return {n for n in names if any(re.match(p, n) for p in patterns)}

    assert matched("row") == {n for n in names if n.endswith(("o_proj.weight", "down_proj.weight"))}
    column = {n for n in names if re.search(r"\.(q|k|v|up|gate)_proj\.weight$", n)}
    assert matched("column") == column and len(column) == 2 * (5 if act == "swiglu" else 4)


@pytest.mark.parametrize("pos,norm,act", OPTIONS)
def test_future_tokens_do_not_change_past_logits(pos, norm, act):
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos, norm=norm, activation=act, bias=act == "gelu")).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    y = x.clone()
    y[:, 8:] = (x[:, 8:] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert a.shape == (2, 12, VOCAB)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_positions_matter(pos):
    """A repeated token gets different logits at different positions (each encoding reaches the output)."""
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos)).eval()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[7, 3, 3, 3]]))
    assert not torch.allclose(logits[0, 2], logits[0, 3], atol=1e-4)


def test_loss_is_mean_cross_entropy_ignoring_minus_100():
    torch.manual_seed(0)
    model = GPT(small())
    x = torch.randint(0, VOCAB, (4, 16))
    y = torch.randint(0, VOCAB, (4, 16))
    logits, loss = model(x, y)
    manual = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert abs(loss.item() - math.log(VOCAB)) < 0.2  # a fresh model is near uniform
    y_masked = y.clone()
    y_masked[:, :10] = -100
    _, masked = model(x, y_masked)
    expected = nn.functional.cross_entropy(logits[:, 10:].reshape(-1, VOCAB), y[:, 10:].reshape(-1))
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model(x)[1] is None


# Pinned first losses: update only for an intended change in the initialisation or the forward math.
PINNED = {
    "gpt2": (dict(), 4.6059494),
    "llama": (dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False),
              4.6262922),
    "sinusoidal": (dict(pos_encoding="sinusoidal"), 4.6467700),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_first_loss(name):
    overrides, expected = PINNED[name]
    torch.manual_seed(0)
    model = GPT(small(**overrides))
    x = (torch.arange(2 * 17).reshape(2, 17) * 37 + 11) % VOCAB  # fixed input, independent of any RNG
    _, loss = model(x[:, :-1], x[:, 1:])
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_tied_embedding_shares_storage_and_untied_does_not():
    tied = GPT(small(tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = GPT(small(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_initialisation_scales_residual_projections_and_zeroes_biases():
    torch.manual_seed(0)
    model = GPT(small(n_layer=8, d_model=128, init_std=0.02, activation="swiglu"))
    block = model.blocks[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for weight in (block.attn.o_proj.weight, block.mlp.down_proj.weight):
        assert weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)
    biases = [p for n, p in model.named_parameters() if n.endswith("proj.bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_swiglu_default_width_rounds_8_3_up_to_64():
    assert mlp_width(small(d_model=128, activation="swiglu")) == 384  # 341.3 -> 384
    assert mlp_width(small(d_model=768, activation="swiglu")) == 2048
    assert mlp_width(small(d_model=128, activation="gelu")) == 512
    assert mlp_width(small(d_model=128, activation="swiglu", d_ff=100)) == 100
    model = GPT(small(d_model=128, activation="swiglu"))
    assert model.blocks[0].mlp.up_proj.weight.shape == (384, 128)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(small(dropout=0.5))
    x = torch.randint(0, VOCAB, (1, 16))
    assert not torch.allclose(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(small(pos_encoding="rotary"))
    x = torch.randint(0, VOCAB, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_activation_checkpointing(True)
    _, loss_ckpt = model(x, x)
    loss_ckpt.backward()
    assert loss_ckpt.item() == loss.item()
    for g, p in zip(expected, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_kv_cache_reproduces_the_full_forward(pos):
    """Prefill 5 tokens, then 3 at once, then one at a time: each step's logits equal the full pass's."""
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos)).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_kv_cache()
        pieces = [model(x[:, :5], kv_cache=cache)[0], model(x[:, 5:8], kv_cache=cache, start_pos=5)[0]]
        pieces += [model(x[:, t : t + 1], kv_cache=cache, start_pos=t)[0] for t in range(8, 16)]
    assert cache[0].length == 16
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_cache_and_position_mistakes_are_errors():
    model = GPT(small()).eval()
    cache = model.new_kv_cache()
    model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    with pytest.raises(ValueError, match="start_pos=3"):
        model(torch.tensor([[4]]), kv_cache=cache, start_pos=0)
    with pytest.raises(ValueError, match="context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _shard(linear: nn.Linear, dim: int, part: int, parts: int, keep_bias: bool = True) -> nn.Linear:
    """The part of a Linear one tensor-parallel rank holds: dim 0 = output columns, dim 1 = input rows."""
    weight = linear.weight.detach().chunk(parts, dim=dim)[part]
    shard = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None and keep_bias)
    shard.weight.data.copy_(weight)
    if shard.bias is not None:
        bias = linear.bias.detach()
        shard.bias.data.copy_(bias.chunk(parts)[part] if dim == 0 else bias)
    return shard


@pytest.mark.parametrize("pos,act", [("rotary", "swiglu"), ("learned", "gelu")])
def test_tensor_parallel_shards_sum_to_the_full_layer(pos, act):
    """As AutoTP splits them (q/k/v/up/gate by columns, o/down by rows), two shards' outputs sum to the full
    layer's: the forward passes take the local head count and widths from the weights, not the config."""
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos, activation=act)).eval()
    block, tp = model.blocks[0], 2
    x = torch.randn(2, 10, 32)
    rotary = None
    if pos == "rotary":
        from pipeline.model.gpt import rotary_angles

        rotary = rotary_angles(torch.arange(10), 8)
    with torch.no_grad():
        attn_sum = torch.zeros(2, 10, 32)
        mlp_sum = torch.zeros(2, 10, 32)
        for part in range(tp):
            attn = copy.deepcopy(block.attn)
            for m in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, m, _shard(getattr(block.attn, m), 0, part, tp))
            attn.o_proj = _shard(block.attn.o_proj, 1, part, tp, keep_bias=part == 0)
            attn_sum += attn(x, rotary)
            mlp = copy.deepcopy(block.mlp)
            for m in ("up_proj", "gate_proj") if act == "swiglu" else ("up_proj",):
                setattr(mlp, m, _shard(getattr(block.mlp, m), 0, part, tp))
            mlp.down_proj = _shard(block.mlp.down_proj, 1, part, tp, keep_bias=part == 0)
            mlp_sum += mlp(x)
        assert torch.allclose(attn_sum, block.attn(x, rotary), atol=1e-5)
        assert torch.allclose(mlp_sum, block.mlp(x), atol=1e-5)


def test_bf16_loss_in_fp32_chunks_matches_the_full_upcast(monkeypatch):
    """16-bit logits: the loss upcasts one chunk of rows at a time (checkpointed), never the whole logits; value
    and gradient equal F.cross_entropy on the fp32 copy, ignored targets included."""
    import torch.nn.functional as F

    from pipeline.model import gpt

    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (3, 7))
    targets[1, 2] = targets[2, 5] = -100
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits.float().reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    reference.backward()
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 4 * 50)  # 4 rows per chunk: 6 chunks for 21 rows
    loss = gpt.cross_entropy_fp32(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, reference, rtol=1e-6)
    assert logits.grad.dtype == torch.bfloat16
    assert torch.equal(logits.grad, reference_logits.grad)
