"""Parameter counts and training FLOPs of a GPT config, from the config alone (no torch: 175B is instant).

The counts mirror pipeline.model.gpt.GPT exactly (a test compares them with sum(p.numel()) for every option):

    embedding       vocab x d_model                      (tok_emb)
    unembedding     vocab x d_model, 0 when tied         (lm_head)
    positional      context x d_model, learned only      (pos_emb; sinusoidal and rotary have no parameters)
    attention       W_Q, W_O d_model x d_model and W_K, W_V d_model x (n_kv_head x head_dim) per layer
                    (q/k/v/o_proj; grouped-query attention shrinks K and V)
    mlp             2 (GELU) or 3 (SwiGLU) matrices d_model x d_ff per layer   (up/[gate]/down_proj)
    biases          per layer 4 d_model + (1 or 2) d_ff + d_model, when bias=true
    norms           2 per layer + final (+ emb_norm): d_model weights (+ d_model biases for LayerNorm with
                    bias=true); QK-norm adds 2 x head_dim per layer
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import ConfigError, ModelConfig, kv_heads, mlp_width
from pipeline.config.hf_shape import with_checkpoint_shape


@dataclass
class ParameterBreakdown:
    """Parameters by component; every field sums over all layers."""

    embedding: int  # token embedding matrix, vocab x d_model
    unembedding: int  # lm_head matrix (0 when tied to the embedding)
    attention_qo_each: int  # one of W_Q, W_O: n_layer x d_model x d_model
    attention_kv_each: int  # one of W_K, W_V: n_layer x d_model x n_kv_head x head_dim (= qo without GQA)
    mlp_matrices_each: int  # one of W_up, W_gate (SwiGLU), W_down: n_layer x d_model x d_ff
    n_mlp_matrices: int  # 2 (GELU) or 3 (SwiGLU)
    positional: int  # learned position table (0 for sinusoidal and rotary)
    biases: int  # biases of the linear layers (norm biases are in `norms`)
    norms: int  # LayerNorm / RMSNorm weights and biases

    @property
    def attention(self) -> int:
        return 2 * self.attention_qo_each + 2 * self.attention_kv_each

    @property
    def mlp(self) -> int:
        return self.n_mlp_matrices * self.mlp_matrices_each

    @property
    def weight_matrices(self) -> int:
        """Embedding, unembedding, attention and MLP matrices: the count the GPT-3 paper reports."""
        return self.embedding + self.unembedding + self.attention + self.mlp

    @property
    def total(self) -> int:
        """Every parameter of the module: sum(p.numel() for p in GPT(cfg).parameters())."""
        return self.weight_matrices + self.positional + self.biases + self.norms

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the embedding, unembedding and position tables."""
        return self.attention + self.mlp + self.biases + self.norms


def count_parameters(cfg: ModelConfig) -> ParameterBreakdown:
    if cfg.vocab_size is None:
        raise ValueError(
            "model.vocab_size is null: set it (or take it from a prepared data set) to count parameters."
        )
    d, n_layer, vocab = cfg.d_model, cfg.n_layer, cfg.vocab_size
    d_ff = mlp_width(cfg)
    n_mlp = 3 if cfg.activation == "swiglu" else 2
    kv_width = kv_heads(cfg) * (d // cfg.n_head)
    # q/o biases of width d, k/v of kv_width; up (and gate) biases of width d_ff; the down bias of width d.
    biases = n_layer * (2 * d + 2 * kv_width + (n_mlp - 1) * d_ff + d) if cfg.bias else 0
    per_norm = 2 * d if cfg.norm == "layernorm" and cfg.bias else d
    n_norms = 2 * n_layer + 1 + cfg.embedding_norm
    qk_norms = 2 * n_layer * (d // cfg.n_head) if cfg.qk_norm else 0  # RMSNorm weights of head_dim
    return ParameterBreakdown(
        embedding=vocab * d,
        unembedding=0 if cfg.tie_embeddings else vocab * d,
        attention_qo_each=n_layer * d * d,
        attention_kv_each=n_layer * d * kv_width,
        mlp_matrices_each=n_layer * d * d_ff,
        n_mlp_matrices=n_mlp,
        positional=cfg.context_length * d if cfg.pos_encoding == "learned" else 0,
        biases=biases,
        norms=n_norms * per_norm + qk_norms,
    )


def training_flops_per_token(cfg: ModelConfig, attended_context: float | None = None) -> float:
    """Model FLOPs of one training token (forward + backward) as PaLM counts them for MFU (Chowdhery et al.
    2022, appendix B; nanoGPT's estimate_mfu does the same):

        6 N + 12 n_layer d_model context_length

    N is the parameters that enter a matrix product for every token: the attention and MLP matrices (K and V
    at their grouped-query width) and the output projection vocab x d_model (counted even when tied, since the
    logits are computed; the input embedding is a lookup and costs nothing; biases and norms are negligible and
    left out). 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). The second term is attention's QK^T
    and AV products over the full context (not halved for the causal mask, as in PaLM; query heads all count,
    grouped-query attention shares K and V but not these products). Under document masking a token attends
    over its document's segment only: pass attended_context = sum of squared segment lengths / tokens of the
    windows trained on (attended_context() measures it), which replaces context_length.
    """
    p = count_parameters(cfg)
    matmul_params = p.attention + p.mlp + cfg.vocab_size * cfg.d_model
    context = cfg.context_length if attended_context is None else attended_context
    return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.d_model * context


def attended_context(inputs, eos_id: int) -> float:
    """The context that document-masked attention computes over, per token, in PaLM's full-square count: the
    sum over each window's document segments (an EOS opens one) of length^2, divided by the tokens. Equals
    context_length for windows without an EOS. inputs: (n, T) integer array of model inputs."""
    import numpy as np

    inputs = np.asarray(inputs)
    n, length = inputs.shape
    total = 0
    for row in inputs:
        cuts = np.flatnonzero(row[1:] == eos_id) + 1  # an EOS at index 0 opens the window's first segment anyway
        segments = np.diff(np.concatenate([[0], cuts, [length]]))
        total += int((segments.astype(np.int64) ** 2).sum())
    return total / (n * length)


def format_breakdown(cfg: ModelConfig) -> str:
    """A table of count_parameters(cfg) and the training FLOPs per token, for `pipeline params`."""
    p = count_parameters(cfg)
    rows = [
        ("token embedding (vocab x d_model)", p.embedding),
        ("unembedding / lm_head" + (" (tied: shared)" if cfg.tie_embeddings else ""), p.unembedding),
    ]
    rows += [(f"attention {m} matrices, all layers", p.attention_qo_each if m in ("W_Q", "W_O") else p.attention_kv_each)
             for m in ("W_Q", "W_K", "W_V", "W_O")]
    mlp_names = ["up", "gate", "down"] if p.n_mlp_matrices == 3 else ["up", "down"]
    rows += [(f"MLP {m} matrices, all layers", p.mlp_matrices_each) for m in mlp_names]
    rows += [
        ("= weight matrices", p.weight_matrices),
        (f"positional table ({cfg.pos_encoding})", p.positional),
        ("biases (linear layers)", p.biases),
        ("norm weights" + (" and biases" if cfg.norm == "layernorm" and cfg.bias else "")
         + (" (with QK-norm)" if cfg.qk_norm else ""), p.norms),
        ("= total parameters", p.total),
        ("non-embedding parameters (Kaplan N)", p.non_embedding),
    ]
    flops_label = "training FLOPs per token (6N + 12 L d T)"
    width = max(len(name) for name, _ in [*rows, (flops_label, 0)])
    lines = [
        f"model {cfg.name}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads of "
        f"{cfg.d_model // cfg.n_head}{_kv_note(cfg)}, d_ff {mlp_width(cfg)} ({cfg.activation}), vocab {cfg.vocab_size}, "
        f"context {cfg.context_length}",
        "",
    ]
    lines += [f"  {name:<{width}}  {value:>18,}" for name, value in rows]
    lines += ["", f"  {flops_label:<{width}}  {training_flops_per_token(cfg):>18,.0f}"]
    if cfg.document_mask:
        lines += ["  (document masking: training replaces T by the attended context measured on its data, "
                  "sum of squared document lengths / tokens, and logs it as attended_context)"]
    return "\n".join(lines)


def _kv_note(cfg: ModelConfig) -> str:
    n_kv = kv_heads(cfg)
    if n_kv == cfg.n_head:
        return ""
    return " (multi-query: 1 key/value head)" if n_kv == 1 else f" ({n_kv} key/value heads)"


def model_for_data(model: ModelConfig, vocab_size: int, eos_id: int | None = None) -> ModelConfig:
    """The model config with its vocabulary (and, under document masking, the EOS id) taken from the tokenizer
    when not set; with model.init_from, its shape and architecture from the checkpoint's config.json."""
    if model.init_from is not None:
        model = with_checkpoint_shape(model)
    if model.document_mask and model.eos_id is None and eos_id is not None:
        model = dataclasses.replace(model, eos_id=eos_id)
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=vocab_size)
    if model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size}): "
            f"leave model.vocab_size unset (null) to follow the tokenizer, or set it to >= {vocab_size}."
        )
    return model

