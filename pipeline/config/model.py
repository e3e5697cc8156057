"""model.*: the shape of the decoder-only transformer, its checks, and the widths derived from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.config.base import (
    FREE,
    MATH,
    Choice,
    ConfigError,
    choice,
    divisors,
    later,
    non_negative,
    positive,
)


class PosEncoding(Choice):
    learned = "learned"
    sinusoidal = "sinusoidal"
    rotary = "rotary"
    alibi = "alibi"


class AttentionKernel(Choice):
    auto = "auto"
    sdpa = "sdpa"
    flex = "flex"


class Norm(Choice):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Activation(Choice):
    gelu = "gelu"
    swiglu = "swiglu"


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer."""

    name: str = field(default="tiny", metadata=MATH)
    # Vocabulary size in tokens; null takes it from the prepared data set's tokenizer.
    vocab_size: int | None = field(default=None, metadata=MATH)
    # Tokens the model attends over; data windows hold context_length + 1 tokens.
    context_length: int = field(default=128, metadata=MATH)
    n_layer: int = field(default=4, metadata=MATH)
    n_head: int = field(default=4, metadata=MATH)
    # Key/value heads (grouped-query attention, Ainslie et al. 2023): null = n_head (multi-head), 1 = multi-query.
    # Must divide n_head; each group of n_head / n_kv_head query heads shares one key/value head.
    n_kv_head: int | None = field(default=None, metadata=later(None))
    d_model: int = field(default=128, metadata=MATH)
    # Hidden width of the MLP; null means 4 * d_model for GELU and 8/3 * d_model rounded up to a multiple
    # of 64 for SwiGLU (mlp_width below).
    d_ff: int | None = field(default=None, metadata=MATH)
    dropout: float = field(default=0.0, metadata=MATH)
    bias: bool = field(default=True, metadata=MATH)
    tie_embeddings: bool = field(default=True, metadata=MATH)
    # learned | sinusoidal | rotary | alibi (Press et al. 2022, as BLOOM: a per-head linear bias on distance)
    pos_encoding: PosEncoding = field(default=PosEncoding.learned, metadata=MATH)
    # A norm right after the token embedding (BLOOM's word_embeddings_layernorm).
    embedding_norm: bool = field(default=False, metadata=later(False))
    # RoPE's base wavelength theta (Su et al. 2021: 10000; Llama 3: 500000).
    rope_theta: float = field(default=10000.0, metadata=later(10000.0))
    # Attention never crosses a document boundary of a packed window and positions restart at each document:
    # a document's segment starts at the EOS that precedes it (the windows' EOS tokens are the boundaries
    # prepare records; doc_starts.npy holds the same offsets + 1). Off for a model built in code, which has no EOS id
    # to mask with; every shipped model option (conf/model/) turns it on.
    document_mask: bool = field(default=False, metadata=later(False))
    # The kernel of document-masked attention: sdpa (a dense block-diagonal mask; what trains on CPU, where
    # FlexAttention has no backward) | flex (FlexAttention with a block mask, compiled; CUDA) | auto (flex on
    # CUDA, sdpa elsewhere). Either computes the same attention.
    attention_kernel: AttentionKernel = field(default=AttentionKernel.auto, metadata=FREE)
    # The EOS id that separates documents; null takes it from the prepared data set's tokenizer.
    eos_id: int | None = field(default=None, metadata=later(None))
    # RMSNorm of each head's queries and keys before the dot product (Dehghani et al. 2023; OLMo 2, Qwen 3).
    qk_norm: bool = field(default=False, metadata=later(False))
    # Coefficient of the z-loss z * mean(log^2 Z) on the softmax normaliser Z of the logits (PaLM: 1e-4); 0: off.
    # Added to the training loss only (validation reports the cross-entropy) and logged as train/z_loss.
    z_loss: float = field(default=0.0, metadata=later(0.0))
    # layernorm | rmsnorm
    norm: Norm = field(default=Norm.layernorm, metadata=MATH)
    # gelu | swiglu
    activation: Activation = field(default=Activation.gelu, metadata=MATH)
    # Standard deviation of the normal init; residual projections are scaled by 1/sqrt(2 * n_layer).
    init_std: float = field(default=0.02, metadata=MATH)
    # µP (maximal update parametrisation, Yang et al. 2022) relative to a base width: null is the standard
    # parametrisation. With m = d_model / mup_base_width, the hidden matrices start at init_std / sqrt(m) and
    # train (AdamW) at lr / m, and the logits are multiplied by 1 / m; embeddings, norms and biases keep init_std
    # and lr. At d_model = mup_base_width it is the standard model; a learning rate tuned there transfers.
    mup_base_width: int | None = field(default=None, metadata=later(None))
    # The norms' epsilon; null: 1e-5 for layernorm, 1e-6 for rmsnorm (an imported checkpoint sets its own).
    norm_eps: float | None = field(default=None, metadata=later(None))
    # A local Hugging Face model directory (config.json + safetensors: GPT-2, Llama, Mistral without a sliding window,
    # Qwen 3, BLOOM) whose weights start the run; its config.json sets the model's shape and architecture
    # (pipeline.model.hf_import; an override of them that disagrees is refused). Null: GPT-2's random init.
    init_from: str | None = field(default=None, metadata=FREE)


POS_ENCODINGS = PosEncoding.values()
NORMS = Norm.values()
ACTIVATIONS = Activation.values()


def width_multiplier(cfg: ModelConfig) -> float:
    """µP's m = d_model / mup_base_width (1.0 without µP)."""
    return 1.0 if cfg.mup_base_width is None else cfg.d_model / cfg.mup_base_width


def norm_epsilon(cfg: ModelConfig) -> float:
    """The norms' epsilon: model.norm_eps, else 1e-5 for LayerNorm (torch's and GPT-2's) and 1e-6 for RMSNorm."""
    if cfg.norm_eps is not None:
        return cfg.norm_eps
    return 1e-5 if cfg.norm == "layernorm" else 1e-6


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads: model.n_kv_head, or n_head when it is null."""
    return cfg.n_head if cfg.n_kv_head is None else cfg.n_kv_head


def mlp_width(cfg: ModelConfig) -> int:
    """The MLP's hidden width d_ff. When model.d_ff is null: 4 * d_model for GELU; for SwiGLU 8/3 * d_model
    rounded up to a multiple of 64 (three matrices of 8/3 d_model hold as many parameters as GELU's two of
    4 d_model, as in PaLM and Llama; the rounding keeps matrix shapes friendly to the hardware)."""
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.activation == "swiglu":
        return 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return 4 * cfg.d_model


def validate_model(model: ModelConfig) -> None:
    for key in ("context_length", "n_layer", "n_head", "d_model"):
        positive(f"model.{key}", getattr(model, key))
    if model.norm_eps is not None and not 0 < model.norm_eps < 1:
        raise ConfigError(f"model.norm_eps={model.norm_eps} must be in (0, 1) (1e-5 or 1e-6 are usual), or null.")

    if model.d_model % model.n_head:
        raise ConfigError(
            f"model.d_model={model.d_model} is not divisible by model.n_head={model.n_head}: "
            f"choose n_head among the divisors of d_model (e.g. "
            f"{', '.join(str(h) for h in divisors(model.d_model)[:8])}) or change d_model."
        )
    if model.pos_encoding == "rotary" and (model.d_model // model.n_head) % 2:
        raise ConfigError(
            f"rotary position encoding needs an even head size; d_model/n_head = "
            f"{model.d_model // model.n_head}: change model.n_head or model.d_model."
        )
    choice("model.pos_encoding", model.pos_encoding, PosEncoding)
    n_kv = kv_heads(model)
    if n_kv <= 0 or model.n_head % n_kv:
        raise ConfigError(
            f"model.n_kv_head={model.n_kv_head} must divide model.n_head={model.n_head}: choose among "
            f"{', '.join(map(str, divisors(model.n_head)))} (1 is multi-query attention, null is n_head)."
        )
    positive("model.rope_theta", model.rope_theta)
    choice("model.attention_kernel", model.attention_kernel, AttentionKernel)
    if model.mup_base_width is not None:
        positive("model.mup_base_width", model.mup_base_width)
    if model.z_loss < 0:
        raise ConfigError(f"model.z_loss={model.z_loss} must be >= 0 (0 turns it off; PaLM used 1e-4).")
    choice("model.norm", model.norm, Norm)
    choice("model.activation", model.activation, Activation)
    if model.vocab_size is not None:
        positive("model.vocab_size", model.vocab_size)
    if model.d_ff is not None:
        positive("model.d_ff", model.d_ff)
    if model.eos_id is not None:
        non_negative("model.eos_id", model.eos_id, "a token id")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout} must be in [0, 1).")
    positive("model.init_std", model.init_std)
