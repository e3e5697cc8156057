"""The 2026 model options, each against an independent statement of what it means: document masking equals
running documents one by one, grouped-query attention equals multi-head attention with shared K/V heads,
QK-norm, z-loss, RoPE theta and ALiBi (BLOOM's slopes), with the KV cache and tensor-parallel shards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, ModelConfig, ParallelConfig, validate_model, validate_parallel
from pipeline.model.gpt import GPT, alibi_slopes, document_segments
from pipeline.model.size import attended_context, count_parameters, training_flops_per_token

VOCAB, EOS = 101, 2


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=4, d_model=32, d_ff=None, eos_id=EOS)
    return ModelConfig(**{**base, **kw})


def documents(rng: torch.Generator, lengths: list[int]) -> list[torch.Tensor]:
    """Token ids without EOS (ids 3..VOCAB-1)."""
    return [torch.randint(3, VOCAB, (n,), generator=rng) for n in lengths]


def packed(docs: list[torch.Tensor]) -> torch.Tensor:
    """As prepare packs them: each document followed by EOS, so that an EOS precedes every document but the
    first; the window starts with an EOS here (the end of the document before it)."""
    parts = []
    for doc in docs:
        parts += [torch.tensor([EOS]), doc]
    return torch.cat(parts)


@pytest.mark.parametrize("block", [1024, 8], ids=["whole-mask", "query-blocks"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary", "alibi"])
def test_a_packed_window_under_document_masking_equals_its_documents_run_one_by_one(pos, block, monkeypatch):
    """The loss of a packed batch equals the losses of its documents run alone (each after its EOS), summed
    over the same targets; positions restart at each document (learned, sinusoidal, RoPE and ALiBi). With
    QUERY_BLOCK below the window the mask is materialised 8 queries at a time (what a long window does)."""
    monkeypatch.setattr("pipeline.model.gpt.QUERY_BLOCK", block)
    torch.manual_seed(0)
    model = GPT(small(pos_encoding=pos, document_mask=True, qk_norm=pos == "rotary", n_kv_head=2)).eval()
    docs = documents(torch.Generator().manual_seed(1), [5, 9, 3, 11])
    window = packed(docs)  # 32 tokens = 28 + 4 EOS
    inputs, targets = window[:-1][None], window[1:][None]
    with torch.no_grad():
        logits, loss = model(inputs, targets)
        alone = []
        offset = 0
        for doc in docs:
            segment = torch.cat([torch.tensor([EOS]), doc])  # the document's segment: its EOS, then its tokens
            seg_logits, _ = model(segment[None])
            alone.append(seg_logits[0])
            offset += len(segment)
        alone = torch.cat(alone)[: inputs.shape[1]]
    assert torch.allclose(logits[0], alone, atol=1e-5)
    summed = F.cross_entropy(alone, targets[0], reduction="mean")
    assert loss.item() == pytest.approx(summed.item(), rel=1e-6)
    # Without the mask the same window gives other logits after the first document (attention crosses).
    plain = copy.deepcopy(model)
    plain.cfg = small(pos_encoding=pos, document_mask=False, qk_norm=pos == "rotary", n_kv_head=2)
    with torch.no_grad():
        crossing, _ = plain(inputs)
    assert torch.allclose(crossing[0, :6], logits[0, :6], atol=1e-5)
    assert not torch.allclose(crossing[0, 6:], logits[0, 6:], atol=1e-3)


def test_attention_in_query_blocks_gives_the_whole_masks_loss_and_gradients(monkeypatch):
    """A window longer than QUERY_BLOCK attends a block of queries at a time over the keys it may see: the
    training loss and every gradient equal those of one attention call with the whole mask."""
    torch.manual_seed(0)
    model = GPT(small(pos_encoding="rotary", document_mask=True, n_kv_head=2))
    window = packed(documents(torch.Generator().manual_seed(1), [5, 9, 3, 11]))
    inputs, targets = window[:-1][None].repeat(2, 1), window[1:][None].repeat(2, 1)
    results = []
    for block in (1024, 7):
        monkeypatch.setattr("pipeline.model.gpt.QUERY_BLOCK", block)
        model.zero_grad()
        _, loss = model(inputs, targets)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, whole_grads), (blocks, block_grads) = results
    assert blocks == pytest.approx(whole, rel=1e-6)
    for name, grad in whole_grads.items():
        assert torch.allclose(block_grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_document_segments_start_at_each_eos_and_match_prepares_doc_starts():
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4]])
    assert document_segments(ids, EOS, 0, None).tolist() == [[0, 0, 2, 2, 2, 2, 6, 7, 7]]
    # prepare's doc_starts are the offsets after each EOS: a segment's start + 1
    starts = sorted({s + 1 for s in document_segments(ids, EOS, 0, None)[0].tolist() if s > 0})
    assert starts == [i + 1 for i, t in enumerate(ids[0].tolist()) if t == EOS]
    # continuing a cache whose open segment began at 4
    assert document_segments(torch.tensor([[1, EOS, 3]]), EOS, 10, torch.tensor([4])).tolist() == [[4, 11, 11]]


@pytest.mark.parametrize("options", [
    dict(pos_encoding="rotary", document_mask=True, n_kv_head=1),
    dict(pos_encoding="learned", document_mask=True, qk_norm=True),
    dict(pos_encoding="alibi", document_mask=True),
    dict(pos_encoding="alibi", embedding_norm=True),
    dict(pos_encoding="rotary", n_kv_head=2, qk_norm=True, rope_theta=500000.0),
])
def test_kv_cache_reproduces_the_full_forward(options):
    """Prefill, then a few tokens at once, then one at a time, across document boundaries: the cache (which
    holds only n_kv_head heads) and the open document segment carry over exactly."""
    torch.manual_seed(0)
    model = GPT(small(**options)).eval()
    x = torch.randint(3, VOCAB, (2, 32))
    x[0, [3, 9, 20]] = EOS
    x[1, [12, 13]] = EOS
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_kv_cache()
        pieces = [model(x[:, :5], kv_cache=cache)[0], model(x[:, 5:11], kv_cache=cache, start_pos=5)[0]]
        pieces += [model(x[:, t : t + 1], kv_cache=cache, start_pos=t)[0] for t in range(11, 32)]
    kv_heads = options.get("n_kv_head", 4)
    assert cache[0].k.shape == (2, kv_heads, 32, 8)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads():
    """n_kv_head=2 of 4: the same outputs as a multi-head model whose K/V heads 0,1 and 2,3 are copies."""
    torch.manual_seed(0)
    gqa = GPT(small(pos_encoding="rotary", n_kv_head=2)).eval()
    mha = GPT(small(pos_encoding="rotary")).eval()
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            heads = tensor.view(2, 8, *tensor.shape[1:])
            state[name] = heads.repeat_interleave(2, dim=0).reshape(32, *tensor.shape[1:])
    mha.load_state_dict(state)
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.allclose(gqa(x)[0], mha(x)[0], atol=1e-5)
    assert gqa.blocks[0].attn.k_proj.weight.shape == (16, 32)
    assert count_parameters(small(n_kv_head=1)).attention_kv_each == 2 * 32 * 8


def test_qk_norm_normalises_each_heads_queries_and_keys():
    """With QK-norm the attention logits do not grow with the scale of W_Q and W_K (that is what keeps them
    bounded); without it they do."""
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (1, 16))
    for qk_norm, changes in ((True, False), (False, True)):
        model = GPT(small(qk_norm=qk_norm)).eval()
        with torch.no_grad():
            before, _ = model(x)
            for block in model.blocks:
                block.attn.q_proj.weight.mul_(10.0)
                block.attn.q_proj.bias.mul_(10.0)
            after, _ = model(x)
        assert (not torch.allclose(before, after, atol=1e-4)) is changes
    names = {n for n, _ in GPT(small(qk_norm=True)).named_parameters()}
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names


def test_z_loss_adds_its_coefficient_times_mean_log_z_squared_in_training_only():
    torch.manual_seed(0)
    model = GPT(small(z_loss=1e-2))
    x = torch.randint(0, VOCAB, (2, 16))
    y = x.roll(-1, dims=1)
    y[0, :3] = -100
    logits, loss = model(x, y)
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
    log_z = logits.logsumexp(-1)
    expected_z = (log_z.square() * (y != -100)).sum() / (y != -100).sum()
    assert model.last_z_loss.item() == pytest.approx(expected_z.item(), rel=1e-6)
    assert loss.item() == pytest.approx(ce.item() + 1e-2 * expected_z.item(), rel=1e-6)
    loss.backward()  # the term has a gradient
    model.eval()
    assert model(x, y)[1].item() == pytest.approx(ce.item(), rel=1e-6)


def test_rope_theta_changes_the_rotation():
    torch.manual_seed(0)
    a = GPT(small(pos_encoding="rotary")).eval()
    b = copy.deepcopy(a)
    b.cfg = small(pos_encoding="rotary", rope_theta=500000.0)
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.allclose(a(x)[0][:, 0], b(x)[0][:, 0], atol=1e-6)  # position 0 is not rotated
        assert not torch.allclose(a(x)[0][:, 5:], b(x)[0][:, 5:], atol=1e-4)


def test_alibi_slopes_are_blooms_and_the_bias_is_linear_in_distance():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** (-i) for i in range(1, 9)])
    # 12 heads: the 8 of 8 heads, then the odd terms of the 16-head sequence (BLOOM's build_alibi_tensor)
    assert alibi_slopes(12).tolist() == pytest.approx([2 ** (-i) for i in range(1, 9)] + [2 ** (-i / 2) for i in (1, 3, 5, 7)])
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in (1, 4, 6, 12, 20, 32):
        assert torch.allclose(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")).float())
    # ALiBi has no positional parameters and sees positions: a repeated token's logits differ by position
    torch.manual_seed(0)
    model = GPT(small(pos_encoding="alibi")).eval()
    assert not any("pos_emb" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        logits, _ = model(torch.tensor([[7, 3, 3, 3]]))
    assert not torch.allclose(logits[0, 2], logits[0, 3], atol=1e-4)


def test_options_are_validated_before_any_work():
    with pytest.raises(ConfigError, match="n_kv_head=3 must divide model.n_head=4"):
        validate_model(small(n_kv_head=3))
    with pytest.raises(ConfigError, match="z_loss"):
        validate_model(small(z_loss=-1.0))
    with pytest.raises(ConfigError, match="n_kv_head=1"):
        validate_parallel(ParallelConfig(num_workers=2, tensor_parallel=2), small(n_kv_head=1))
    with pytest.raises(ConfigError, match="alibi"):
        validate_parallel(ParallelConfig(num_workers=2, tensor_parallel=2), small(pos_encoding="alibi"))
    with pytest.raises(ValueError, match="eos_id"):
        GPT(small(document_mask=True, eos_id=None))


def test_flops_count_grouped_query_attention_and_the_attended_context():
    mha, mqa = small(), small(n_kv_head=1)
    p, q = count_parameters(mha), count_parameters(mqa)
    assert p.attention - q.attention == 2 * 2 * 32 * (32 - 8)
    assert training_flops_per_token(mha) - training_flops_per_token(mqa) == 6 * (p.attention - q.attention)
    # Documents of 8 tokens in windows of 32: each token attends over 8 positions in PaLM's full-square count.
    windows = torch.randint(3, VOCAB, (4, 32))
    windows[:, [8, 16, 24]] = EOS
    assert attended_context(windows.numpy(), EOS) == 8.0
    assert attended_context(torch.randint(3, VOCAB, (2, 32)).numpy(), EOS) == 32.0
    cfg = small(document_mask=True)
    assert training_flops_per_token(cfg, 8.0) == training_flops_per_token(cfg) - 12 * 2 * 32 * (32 - 8)
    assert math.isclose(training_flops_per_token(cfg, 32.0), training_flops_per_token(cfg))


@pytest.mark.parametrize("options", [
    dict(n_kv_head=1), dict(n_kv_head=2, bias=False), dict(qk_norm=True), dict(qk_norm=True, norm="rmsnorm"),
    dict(pos_encoding="alibi", embedding_norm=True), dict(embedding_norm=True, norm="rmsnorm", bias=False),
])
def test_parameter_count_matches_the_module(options):
    model = GPT(small(**options))
    params = dict(model.named_parameters())
    p = count_parameters(small(**options))
    assert p.total == sum(t.numel() for t in params.values())
    assert p.norms == sum(t.numel() for n, t in params.items() if "norm" in n)
    assert p.biases == sum(t.numel() for n, t in params.items() if n.endswith("proj.bias"))
    assert p.attention == sum(t.numel() for n, t in params.items() if n.endswith(tuple(f"{m}_proj.weight" for m in "qkvo")) and "attn" in n)


def test_z_loss_of_16_bit_logits_is_computed_in_fp32_chunks(monkeypatch):
    """16-bit logits: log Z in fp32, a chunk of rows at a time (as the cross-entropy), the same value."""
    from pipeline.model import gpt

    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 3 * VOCAB)  # 3 rows per chunk
    logits = torch.randn(2, 8, VOCAB).bfloat16().requires_grad_()
    targets = torch.randint(0, VOCAB, (2, 8))
    targets[1, :2] = -100
    chunked = gpt.mean_log_z_squared(logits, targets)
    _, expected = gpt.cross_entropy_and_log_z_squared(logits.detach().float(), targets)
    assert chunked.item() == pytest.approx(expected.item(), rel=1e-6)
    chunked.backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad[1, :2].abs().sum() == 0


@pytest.mark.parametrize("options", [dict(pos_encoding="rotary", n_kv_head=2, qk_norm=True), dict(pos_encoding="learned")])
def test_flex_attention_computes_the_same_document_masked_attention(options):
    """The FlexAttention path (its block mask from the same segments), forward only as CPU allows, gives the
    SDPA path's logits; training with it on CPU is refused before any work."""
    torch.manual_seed(0)
    sdpa = GPT(small(document_mask=True, attention_kernel="sdpa", **options)).eval()
    flex = copy.deepcopy(sdpa)
    flex.cfg = small(document_mask=True, attention_kernel="flex", **options)
    x = torch.randint(3, VOCAB, (2, 32))
    x[0, [3, 9, 20]] = EOS
    x[1, [12, 13]] = EOS
    with torch.no_grad():
        assert flex.uses_flex(x, None) and not sdpa.uses_flex(x, None)
        assert torch.allclose(flex(x)[0], sdpa(x)[0], atol=1e-5)
    with pytest.raises(ConfigError, match="attention_kernel=flex"):
        validate_parallel(ParallelConfig(), small(document_mask=True, attention_kernel="flex"))


def test_checkpoints_written_before_the_options_existed_still_resume(tmp_path):
    """An option counts in the config a checkpoint is compared with only when set: a run without any of them
    has the math config of before (so its checkpoints resume), one with document masking differs by exactly
    the keys it sets."""
    from pathlib import Path

    from pipeline.checkpoint.resume import config_differences
    from pipeline.config import PipelineConfig
    from pipeline.train.driver import math_config

    cfg = PipelineConfig()
    plain = math_config(cfg, small(eos_id=None), Path("data"), "fp32", "x")
    assert not {"n_kv_head", "qk_norm", "z_loss", "document_mask", "eos_id", "rope_theta", "mup_base_width",
                "embedding_norm", "attention_kernel"} & plain["model"].keys()
    assert "optimizer" not in plain["train"] and "muon_lr" not in plain["train"]
    masked = math_config(cfg, small(document_mask=True), Path("data"), "fp32", "x")
    assert config_differences(plain, masked) == ["model.document_mask: '<absent>' -> True",
                                                 "model.eos_id: '<absent>' -> 2"]
