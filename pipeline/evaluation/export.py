"""`pipeline export`: a trained run as a Hugging Face transformers directory (config.json + safetensors +
tokenizer) that loads with `from_pretrained` and generates.

- GPT-2 architecture (learned positions, LayerNorm, GELU): `GPT2LMHeadModel`. GPT-2 always has biases; a
  model trained without them exports exact zeros.
- Llama architecture (rotary positions, RMSNorm, SwiGLU, no biases; grouped-query attention and RoPE theta
  carried over): `LlamaForCausalLM`. Our rotary embedding rotates interleaved pairs (x[2i], x[2i+1]); Llama
  rotates halves (x[i], x[i + d/2]), so the rows of W_Q and W_K are permuted within each head, which leaves
  every attention score unchanged.
- The same with QK-norm: `Qwen3ForCausalLM` (per-head RMSNorm of queries and keys before the rotation; the
  norms' weights permuted like the rows they scale).
- BLOOM architecture (ALiBi, LayerNorm after the embedding, LayerNorm, GELU, biases, d_ff = 4 d_model):
  `BloomForCausalLM`, Q/K/V fused per head as BLOOM lays them out.
- Anything else stops with a message naming the mismatching fields.

Document masking has no Hugging Face counterpart in these models: the exported model gives our logits on any
input that holds one document (no EOS after its first token), which is how it is used for generation.

The tokenizer is a transformers fast tokenizer (tokenizer.json) built from the SentencePiece model by
transformers' own converter, which follows the model's settings (normalizer, whitespace escaping, byte
fallback, user-defined pieces such as "\n"): a BPE model encodes to exactly the pipeline's ids and decodes to
exactly SentencePiece's text (bytes and leading spaces included); a unigram model can differ where two
segmentations score the same. The SentencePiece model itself is kept beside it as tokenizer.model.
A data set tokenized with a checkpoint's own tokenizer (data.tokenizer.hf) exports that tokenizer.json as it was,
with the data set's special tokens.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from data_prep.blend import load_data_info
from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import read_marker, require_latest
from pipeline.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    kv_heads,
    mlp_width,
    norm_epsilon,
    run_dir_for,
    width_multiplier,
)
from pipeline.model.hf_import import halves_order
from pipeline.model.size import model_for_data

log = logging.getLogger(__name__)


def architecture(cfg: ModelConfig) -> str:
    """gpt2 | llama | qwen3 | bloom, or ConfigError naming what matches none."""
    shape = (cfg.pos_encoding, cfg.norm, cfg.activation)
    grouped = kv_heads(cfg) != cfg.n_head
    if shape == ("learned", "layernorm", "gelu") and not (cfg.qk_norm or cfg.embedding_norm or grouped):
        return "gpt2"
    if shape == ("rotary", "rmsnorm", "swiglu") and not (cfg.bias or cfg.embedding_norm):
        return "qwen3" if cfg.qk_norm else "llama"
    if (shape == ("alibi", "layernorm", "gelu") and cfg.bias and cfg.embedding_norm and mlp_width(cfg) == 4 * cfg.d_model
            and not (cfg.qk_norm or grouped)):
        return "bloom"
    raise ConfigError(
        f"model (pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, activation={cfg.activation}, bias={cfg.bias}, "
        f"n_kv_head={cfg.n_kv_head}, qk_norm={cfg.qk_norm}, embedding_norm={cfg.embedding_norm}) matches no Hugging "
        f"Face architecture this exporter writes: GPT-2 needs learned/layernorm/gelu without grouped-query "
        f"attention, QK-norm or embedding norm; Llama (Qwen 3 with qk_norm) needs rotary/rmsnorm/swiglu without "
        f"biases or embedding norm; BLOOM needs alibi/layernorm/gelu with biases, embedding_norm, d_ff = 4 d_model "
        f"and no grouped-query attention or QK-norm."
    )


def _gpt2(cfg: ModelConfig, state: dict[str, torch.Tensor], special: dict[str, int]):
    from transformers import GPT2Config, GPT2LMHeadModel

    d, f = cfg.d_model, mlp_width(cfg)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=d, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=f, activation_function="gelu_new", layer_norm_epsilon=norm_epsilon(cfg),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings, **special,
    )

    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(name, torch.zeros(size))

    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": bias("final_norm.bias", d),
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        # GPT-2's Conv1D stores weights as (in, out): transposed nn.Linear weights.
        out[h + "attn.c_attn.weight"] = torch.cat([state[p + f"attn.{x}_proj.weight"] for x in "qkv"]).T
        out[h + "attn.c_attn.bias"] = torch.cat([bias(p + f"attn.{x}_proj.bias", d) for x in "qkv"])
        out[h + "attn.c_proj.weight"] = state[p + "attn.o_proj.weight"].T
        out[h + "attn.c_proj.bias"] = bias(p + "attn.o_proj.bias", d)
        out[h + "mlp.c_fc.weight"] = state[p + "mlp.up_proj.weight"].T
        out[h + "mlp.c_fc.bias"] = bias(p + "mlp.up_proj.bias", f)
        out[h + "mlp.c_proj.weight"] = state[p + "mlp.down_proj.weight"].T
        out[h + "mlp.c_proj.bias"] = bias(p + "mlp.down_proj.bias", d)
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + f"{theirs}.weight"] = state[p + f"{ours}.weight"]
            out[h + f"{theirs}.bias"] = bias(p + f"{ours}.bias", d)
    return GPT2LMHeadModel, hf_cfg, out


def _interleaved_to_halves(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    head_dim = weight.shape[0] // n_head
    return weight.view(n_head, head_dim, -1)[:, halves_order(head_dim)].reshape_as(weight)


def _llama(cfg: ModelConfig, state: dict[str, torch.Tensor], special: dict[str, int]):
    """Llama, or Qwen 3 (Llama with per-head QK-norm) when cfg.qk_norm."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    head_dim, n_kv = cfg.d_model // cfg.n_head, kv_heads(cfg)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=mlp_width(cfg),
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=n_kv,
        max_position_embeddings=cfg.context_length, rms_norm_eps=norm_epsilon(cfg), hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False,
        tie_word_embeddings=cfg.tie_embeddings, **special,
    )
    if cfg.qk_norm:
        hf_cfg, model_class = Qwen3Config(head_dim=head_dim, **common), Qwen3ForCausalLM
    else:
        hf_cfg, model_class = LlamaConfig(mlp_bias=False, **common), LlamaForCausalLM
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["final_norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = _interleaved_to_halves(state[p + "attn.q_proj.weight"], cfg.n_head)
        out[h + "self_attn.k_proj.weight"] = _interleaved_to_halves(state[p + "attn.k_proj.weight"], n_kv)
        out[h + "self_attn.v_proj.weight"] = state[p + "attn.v_proj.weight"]
        out[h + "self_attn.o_proj.weight"] = state[p + "attn.o_proj.weight"]
        if cfg.qk_norm:
            for x in "qk":
                out[h + f"self_attn.{x}_norm.weight"] = state[p + f"attn.{x}_norm.weight"][halves_order(head_dim)]
        for x in ("gate", "up", "down"):
            out[h + f"mlp.{x}_proj.weight"] = state[p + f"mlp.{x}_proj.weight"]
        out[h + "input_layernorm.weight"] = state[p + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = state[p + "mlp_norm.weight"]
    return model_class, hf_cfg, out


def _bloom(cfg: ModelConfig, state: dict[str, torch.Tensor], special: dict[str, int]):
    from transformers import BloomConfig, BloomForCausalLM

    d, n_head = cfg.d_model, cfg.n_head
    hf_cfg = BloomConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, n_layer=cfg.n_layer, n_head=n_head, layer_norm_epsilon=norm_epsilon(cfg),
        hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings, **special,
    )
    out = {"transformer.word_embeddings.weight": state["tok_emb.weight"], "lm_head.weight": state["lm_head.weight"]}
    for ours, theirs in (("emb_norm", "word_embeddings_layernorm"), ("final_norm", "ln_f")):
        out[f"transformer.{theirs}.weight"], out[f"transformer.{theirs}.bias"] = state[f"{ours}.weight"], state[f"{ours}.bias"]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        # BLOOM's fused projection holds, head by head, that head's query, key and value rows.
        for kind in ("weight", "bias"):
            per_head = [state[p + f"attn.{x}_proj.{kind}"].view(n_head, d // n_head, *([d] if kind == "weight" else []))
                        for x in "qkv"]
            out[h + f"self_attention.query_key_value.{kind}"] = torch.stack(per_head, dim=1).reshape(3 * d, *per_head[0].shape[2:])
            out[h + f"self_attention.dense.{kind}"] = state[p + f"attn.o_proj.{kind}"]
            out[h + f"mlp.dense_h_to_4h.{kind}"] = state[p + f"mlp.up_proj.{kind}"]
            out[h + f"mlp.dense_4h_to_h.{kind}"] = state[p + f"mlp.down_proj.{kind}"]
            out[h + f"input_layernorm.{kind}"] = state[p + f"attn_norm.{kind}"]
            out[h + f"post_attention_layernorm.{kind}"] = state[p + f"mlp_norm.{kind}"]
    return BloomForCausalLM, hf_cfg, out


def _load(model, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in weights.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_weights(cfg: ModelConfig, state: dict[str, torch.Tensor], special: dict[str, int] | None = None):
    """(transformers model class, its config, its state dict) for the weights of our GPT (state). The tensors
    are ours or views of them where the layouts agree (fused or permuted ones are new), so nothing holds a
    second full copy of the model."""
    special = special or {}
    state = dict(state)
    if cfg.mup_base_width is not None:
        # µP's output multiplier 1/m folded into the final norm's affine weights: lm_head(norm(x)) / m exactly.
        for name in ("final_norm.weight", "final_norm.bias"):
            if name in state:
                state[name] = state[name] / width_multiplier(cfg)
    build = {"gpt2": _gpt2, "llama": _llama, "qwen3": _llama, "bloom": _bloom}[architecture(cfg)]
    return build(cfg, {k: v.float() for k, v in state.items()}, special)


def to_hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor], special: dict[str, int] | None = None):
    """A transformers model holding the weights of our GPT (state: its fp32 state dict)."""
    model_class, hf_cfg, weights = hf_weights(cfg, state, special)
    model = model_class(hf_cfg)
    _load(model, weights)
    return model.eval()


def parse_size(text: str) -> int:
    """Bytes of '5GB', '500MB', '2GiB' or '1024' (decimal units as transformers reads them, binary with 'i')."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"eval.export_shard_size={text!r} is not a size: write e.g. 5GB, 500MB or 2GiB.")
    number, unit, binary = match.groups()
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def write_weights(out_dir: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int,
                  skip: set[str] = frozenset()) -> list[str]:
    """The weights as safetensors files of at most max_shard_bytes (a tensor larger than that gets a file of its
    own), converted to dtype one tensor at a time: model.safetensors when one file holds them all, else
    model-00001-of-0000N.safetensors ... with model.safetensors.index.json, as transformers shards them."""
    from safetensors.torch import save_file

    names = [n for n in weights if n not in skip]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = weights[name].numel() * torch.finfo(dtype).bits // 8
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = 0
    for file, shard in zip(files, shards, strict=True):
        tensors = {n: weights[n].detach().to(dtype).contiguous() for n in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        weight_map = {n: f for f, shard in zip(files, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


def hf_tokenizer(sp_model: Path, specials=None):
    """A transformers fast tokenizer equivalent to the SentencePiece model at sp_model (see the module doc); with
    `specials` (data_prep.text_tokenizer.Specials: a checkpoint's SentencePiece model, data.tokenizer.hf), its special
    tokens named by their ids and its document prefix added before every text."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise ConfigError("this transformers is too old to convert a SentencePiece model: pip install 'transformers>=5'")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    bpe = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)} if bpe else [(p.piece, p.score) for p in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if specials is None:  # prepare's own model: its fixed pieces
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>", clean_up_tokenization_spaces=False)
    from tokenizers import processors

    piece = lambda i: proto.pieces[i].piece  # noqa: E731
    if specials.prefix:
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join([*(piece(i) for i in specials.prefix), "$A"]),
            special_tokens=[(piece(i), i) for i in dict.fromkeys(specials.prefix)])
    names = {f"{key}_token": piece(token) for key, token in (("bos", specials.bos_id), ("eos", specials.eos_id),
                                                            ("pad", specials.pad_id), ("unk", specials.unk_id))
             if token >= 0}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **names)


def export_tokenizer(info, out_dir: Path) -> None:
    """The data set's tokenizer as transformers writes one: a SentencePiece model converted (and kept beside it as
    tokenizer.model), a checkpoint's tokenizer.json as it was, with the data set's special tokens."""
    from data_prep.text_tokenizer import HF_TOKENIZER_FILE, specials_of

    if info.tokenizer_file != HF_TOKENIZER_FILE:
        # prepare's own model has no document prefix and its fixed pieces; a checkpoint's keeps its own.
        own = not info.document_prefix and (info.bos_id, info.eos_id, info.pad_id, info.unk_id) == (1, 2, 3, 0)
        hf_tokenizer(info.tokenizer_path, None if own else specials_of(info)).save_pretrained(out_dir)
        shutil.copy2(info.tokenizer_path, out_dir / "tokenizer.model")
        return
    from transformers import PreTrainedTokenizerFast

    from data_prep.text_tokenizer import data_tokenizer

    tokenizer = data_tokenizer(info)
    names = {f"{key}_token": tokenizer.piece(token) for key, token in (
        ("bos", info.bos_id), ("eos", info.eos_id), ("pad", info.pad_id), ("unk", info.unk_id)) if token >= 0}
    PreTrainedTokenizerFast(tokenizer_file=str(info.tokenizer_path), clean_up_tokenization_spaces=False,
                            **names).save_pretrained(out_dir)


def export(cfg: PipelineConfig, data_dir: Path, out_dir: Path | None = None, tag_dir: Path | None = None) -> Path:
    """The run's latest checkpoint (or tag_dir) as a Hugging Face directory (default <run>/hf/<tag>)."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError("pipeline export needs transformers: pip install 'transformers>=5' "
                          "(or the project's dev extra)") from err
    architecture(cfg.model)  # fail before reading any checkpoint
    tag_dir = tag_dir or require_latest(run_dir_for(cfg))
    manifest = load_data_info(data_dir)
    model_cfg = model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id)
    special = {"bos_token_id": manifest.bos_id, "eos_token_id": manifest.eos_id, "pad_token_id": manifest.pad_id}
    dtype = EXPORT_DTYPES[cfg.eval.export_dtype]
    max_shard = parse_size(cfg.eval.export_shard_size)
    model_class, hf_cfg, weights = hf_weights(model_cfg, consolidated_state_dict(tag_dir), special)
    out_dir = out_dir or run_dir_for(cfg) / "hf" / tag_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]:
        old.unlink()  # shards of an earlier export would mix with these
    hf_cfg.architectures = [model_class.__name__]
    hf_cfg.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    hf_cfg.save_pretrained(out_dir)
    # Tied: transformers reads the unembedding from the embedding.
    files = write_weights(out_dir, weights, dtype, max_shard, {"lm_head.weight"} if hf_cfg.tie_word_embeddings else set())
    export_tokenizer(manifest, out_dir)
    log.info("exported step %d of %s as %s (%s, %d file%s) to %s", read_marker(tag_dir)["step"], cfg.run_name,
             model_class.__name__, cfg.eval.export_dtype, len(files), "s" * (len(files) > 1), out_dir)
    return out_dir
