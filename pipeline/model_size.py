"""Parameter counts and training FLOPs of a GPT config, computed from the config alone (175B is instant)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ModelConfig
from pipeline.model import mlp_width


@dataclass
class ParameterBreakdown:
    embedding: int  # token embedding matrix, vocab x d_model
    unembedding: int  # lm_head matrix (0 when tied to the embedding)
    attention_qkvo_each: int  # one of W_Q, W_K, W_V, W_O summed over all layers
    mlp_matrices_each: int  # one MLP matrix (up, gate or down) summed over all layers
    n_mlp_matrices: int  # 2 (GELU) or 3 (SwiGLU)
    positional: int  # learned position table (0 for sinusoidal and rotary)
    biases: int
    norms: int

    @property
    def attention(self) -> int:
        return 4 * self.attention_qkvo_each

    @property
    def mlp(self) -> int:
        return self.n_mlp_matrices * self.mlp_matrices_each

    @property
    def weight_matrices(self) -> int:
        """Embedding, unembedding, attention and MLP matrices: the count the GPT-3 paper reports."""
        return self.embedding + self.unembedding + self.attention + self.mlp

    @property
    def total(self) -> int:
        return self.weight_matrices + self.positional + self.biases + self.norms

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the embedding, unembedding and position tables."""
        return self.attention + self.mlp + self.biases + self.norms


def count_parameters(cfg: ModelConfig) -> ParameterBreakdown:
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is null: set it (or take it from a prepared data set) to count parameters")
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    f = mlp_width(cfg)
    n_mlp = 3 if cfg.activation == "swiglu" else 2
    biases = 0
    if cfg.bias:
        mlp_bias = n_mlp * 0 + (f * (n_mlp - 1)) + d  # up (+gate) biases of width f, down bias of width d
        biases = L * (4 * d + mlp_bias)
    per_norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    norms = (2 * L + 1) * per_norm
    return ParameterBreakdown(
        embedding=V * d,
        unembedding=0 if cfg.tie_embeddings else V * d,
        attention_qkvo_each=L * d * d,
        mlp_matrices_each=L * d * f,
        n_mlp_matrices=n_mlp,
        positional=cfg.context_length * d if cfg.pos_encoding == "learned" else 0,
        biases=biases,
        norms=norms,
    )


def training_flops_per_token(cfg: ModelConfig) -> float:
    """PaLM's model FLOPs (Chowdhery et al. 2022, appendix B): 6N + 12 * n_layer * d_model * context.

    N counts the parameters that take part in matrix products for every token: attention and MLP matrices
    and the output projection (vocab x d_model, even when tied, since the logits are computed); the input
    embedding is a lookup and costs nothing. The second term is attention's QK^T and AV products.
    """
    p = count_parameters(cfg)
    matmul_params = p.attention + p.mlp + cfg.vocab_size * cfg.d_model
    return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.d_model * cfg.context_length


def format_breakdown(cfg: ModelConfig) -> str:
    p = count_parameters(cfg)
    rows = [
        ("token embedding (vocab x d_model)", p.embedding),
        ("unembedding / lm_head" + (" (tied: shared)" if cfg.tie_embeddings else ""), p.unembedding),
    ]
    rows += [(f"attention {m} matrices, all layers", p.attention_qkvo_each) for m in ("W_Q", "W_K", "W_V", "W_O")]
    mlp_names = ["up", "gate", "down"] if p.n_mlp_matrices == 3 else ["up", "down"]
    rows += [(f"MLP {m} matrices, all layers", p.mlp_matrices_each) for m in mlp_names]
    rows += [
        ("= weight matrices", p.weight_matrices),
        ("positional table (learned)", p.positional),
        ("biases", p.biases),
        ("norm weights" + (" and biases" if cfg.norm == "layernorm" and cfg.bias else ""), p.norms),
        ("= total parameters", p.total),
        ("non-embedding parameters (Kaplan N)", p.non_embedding),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"model {cfg.name}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads of "
        f"{cfg.d_model // cfg.n_head}, d_ff {mlp_width(cfg)}, vocab {cfg.vocab_size}, context {cfg.context_length}",
        "",
    ]
    lines += [f"  {name:<{width}}  {value:>18,}" for name, value in rows]
    flops = training_flops_per_token(cfg)
    lines += ["", f"  {'training FLOPs per token (6N + 12 L d T)':<{width}}  {flops:>18,.0f}"]
    return "\n".join(lines)
