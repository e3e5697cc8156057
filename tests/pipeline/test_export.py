"""Exported Hugging Face models compute the same logits as the pipeline's own forward pass."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.evaluation.export import architecture, to_hf_model
from pipeline.model.gpt import GPT


def random_model(**kw) -> tuple[ModelConfig, GPT]:
    cfg = ModelConfig(**{**dict(vocab_size=211, context_length=32, n_layer=2, n_head=4, d_model=64), **kw})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mapping mistake shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


@pytest.mark.parametrize("kw", [
    dict(),  # GPT-2: learned, layernorm, gelu, biases, tied
    dict(bias=False, tie_embeddings=False),
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False),  # Llama
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False),
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=2, rope_theta=500000.0),
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=1, qk_norm=True),
    dict(pos_encoding="alibi", embedding_norm=True),  # BLOOM
    dict(pos_encoding="alibi", embedding_norm=True, tie_embeddings=False, n_head=8),
    # Document masking changes nothing on one document (EOS only at the start): any architecture exports.
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, document_mask=True, eos_id=2),
    dict(mup_base_width=16),  # µP's output multiplier 1/4 folded into the final norm
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False, mup_base_width=32),
], ids=["gpt2", "gpt2-nobias-untied", "llama", "llama-untied", "llama-gqa-theta", "qwen3-mqa-qknorm", "bloom",
        "bloom-untied-8-heads", "llama-document-mask", "gpt2-mup", "llama-untied-mup"])
def test_exported_logits_match_within_1e_4(kw, tmp_path):
    """Through the files a user gets: save_pretrained (config.json + safetensors), then from_pretrained."""
    from transformers import AutoModelForCausalLM

    cfg, model = random_model(**kw)
    to_hf_model(cfg, model.state_dict()).save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = {"learned": "GPT2LMHeadModel", "alibi": "BloomForCausalLM"}.get(
        kw.get("pos_encoding", "learned"), "Qwen3ForCausalLM" if kw.get("qk_norm") else "LlamaForCausalLM")
    assert type(hf).__name__ == expected
    ids = torch.randint(3, 211, (3, 32), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2  # a document after its EOS
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-4


@pytest.fixture(scope="module")
def plays_tokenizer(tmp_path_factory):
    from data_prep.sources import shakespeare_documents
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import TokenizerConfig

    docs = list(shakespeare_documents())[:40]
    return docs, train_tokenizer(docs, TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("tok") / "t.model", seed=0)


def test_exported_tokenizer_encodes_and_decodes_like_sentencepiece(plays_tokenizer, tmp_path):
    """AutoTokenizer on the export: the pipeline's ids for every text, and back to the same text, bytes of
    characters the vocabulary lacks (byte fallback) and leading spaces included."""
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer
    from pipeline.evaluation.export import hf_tokenizer

    docs, path = plays_tokenizer
    hf_tokenizer(path).save_pretrained(tmp_path)
    hf, sp = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(path)
    texts = [*docs, "  two leading spaces,\n\nblank lines", "émigré naïveté 😀 中文", "tabs\tand\u00a0nbsp "]
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:40]
        assert hf.decode(ids) == sp.decode(ids) == text, text[:40]
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (sp.eos_id(), sp.pad_id(), sp.bos_id())


def test_exported_model_generates_like_ours():
    from pipeline.model.generation import generate

    cfg, model = random_model()
    hf = to_hf_model(cfg, model.state_dict(), {"eos_token_id": 2, "pad_token_id": 3})
    prompt = [5, 9, 14]
    ours = generate(model, prompt, 10, temperature=0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, 3:].tolist()
    assert theirs == ours[: len(theirs)]


def test_unsupported_architecture_is_named():
    with pytest.raises(ConfigError, match="matches no Hugging Face architecture"):
        architecture(ModelConfig(pos_encoding="sinusoidal"))


def reference_accuracy(model: GPT, sp_path, limit: int) -> float:
    import json
    from pathlib import Path

    from pipeline.evaluation.export import hf_tokenizer

    tok = hf_tokenizer(sp_path)
    model.eval()
    task = Path(__file__).parents[2] / "pipeline" / "data" / "lm_eval_tasks" / "shakespeare_next_line.jsonl"
    docs = [json.loads(line) for line in task.read_text().splitlines()[:limit]]
    correct = 0
    for doc in docs:
        context = doc["context"].rstrip()
        scores = []
        for choice in doc["choices"]:
            continuation = doc["context"][len(context):] + " " + choice  # lm-eval moves trailing spaces over
            ctx = tok(context, add_special_tokens=False).input_ids
            cont = tok(context + continuation, add_special_tokens=False).input_ids[len(ctx):]
            with torch.no_grad():
                logits, _ = model(torch.tensor([ctx + cont]))
            logp = logits[0, :-1].float().log_softmax(-1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_lm_eval_runs_a_local_task_on_an_exported_model(plays_tokenizer, tmp_path):
    """The downstream hook end to end, offline: export, lm-eval-harness on the shipped local task."""
    from data_prep.tokenizer import load_tokenizer
    from pipeline.evaluation.downstream import run_lm_eval
    from pipeline.evaluation.export import hf_tokenizer

    _, sp_path = plays_tokenizer
    vocab = load_tokenizer(sp_path).get_piece_size()
    cfg = ModelConfig(vocab_size=vocab, context_length=128, n_layer=1, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    hf = to_hf_model(cfg, model.state_dict(), {"eos_token_id": 2, "pad_token_id": 3, "bos_token_id": 1})
    hf.save_pretrained(tmp_path / "hf")
    hf_tokenizer(sp_path).save_pretrained(tmp_path / "hf")
    results = run_lm_eval(tmp_path / "hf", ["shakespeare_next_line"], tmp_path / "work", limit=8)
    # The known answer, computed independently with our own model: for each of the first 8 questions, the
    # choice whose tokens (after the context, split as lm-eval splits a context and its continuation) have the
    # highest summed log-probability.
    assert results["shakespeare_next_line"]["acc"] == pytest.approx(reference_accuracy(model, sp_path, 8))
    assert (tmp_path / "work" / "lm_eval_results.json").is_file()
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        run_lm_eval(tmp_path / "hf", ["no_such_task_xyz"], tmp_path / "work2")


@pytest.mark.parametrize("kw", [
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=2),
    dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, qk_norm=True),
    dict(),
], ids=["llama", "qwen3", "gpt2"])
def test_a_document_masked_model_exports_with_packed_windows_given_position_ids(kw):
    """transformers reads packed documents from position_ids that restart (no attention_mask, no cache): fed our positions
    (counting from each document's EOS), the exported model gives our document-masked logits on packed
    windows too."""
    from pipeline.model.gpt import document_segments

    cfg, model = random_model(document_mask=True, eos_id=2, **kw)
    hf = to_hf_model(cfg, model.state_dict())
    ids = torch.randint(3, 211, (2, 32), generator=torch.Generator().manual_seed(1))
    ids[0, [0, 9, 20]] = 2
    ids[1, [5, 6]] = 2
    positions = torch.arange(32) - document_segments(ids, 2, 0, None)
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("kw,dtype", [
    (dict(pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=2), "fp32"),
    (dict(), "fp32"),
    (dict(tie_embeddings=False), "bf16"),
], ids=["llama-fp32", "gpt2-tied-fp32", "gpt2-untied-bf16"])
def test_sharded_export_loads_with_plain_transformers(kw, dtype, tmp_path):
    """Shards of at most 40 kB (several files and an index, as transformers writes them), written tensor by
    tensor from the state dict without building a second model: from_pretrained loads them; fp32 gives our
    logits within 1e-4, bf16 within bf16's rounding of the weights."""
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation.export import EXPORT_DTYPES, hf_weights, parse_size, write_weights

    cfg, model = random_model(**kw)
    model_class, hf_cfg, weights = hf_weights(cfg, model.state_dict())
    hf_cfg.architectures = [model_class.__name__]
    hf_cfg.save_pretrained(tmp_path)
    files = write_weights(tmp_path, weights, EXPORT_DTYPES[dtype], parse_size("40kB"),
                          {"lm_head.weight"} if hf_cfg.tie_word_embeddings else set())
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 211, (2, 32), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max() < (1e-4 if dtype == "fp32" else 0.1)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024
