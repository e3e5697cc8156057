"""A decoder-only transformer (GPT) built from ModelConfig, readable in one sitting.

The model knows nothing of DeepSpeed, Ray or ranks. Tensor parallelism is applied from outside by
DeepSpeed AutoTP, which matches the layer names below (q/k/v/o_proj, up/gate/down_proj); so the forward
passes derive head counts and widths from the weights they hold, never from the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def mlp_width(cfg: ModelConfig) -> int:
    """d_ff, or its default: 4 * d_model (GELU); 8/3 * d_model rounded up to a multiple of 64 (SwiGLU)."""
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.activation == "swiglu":
        return 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return 4 * cfg.d_model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model)
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """sin/cos of increasing wavelength (Vaswani et al. 2017), shape (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


def rotary_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, D) by the angles of their positions."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, rotary=None, cache=None):
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        n_heads = q.shape[-1] // self.head_dim  # local heads: fewer under tensor parallelism
        q, k, v = (t.view(batch, length, n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if cache.get("k") is not None:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # With a cache, the new queries sit at the end of the sequence: the causal mask is offset.
        if k.shape[2] == length:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            offset = k.shape[2] - length
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=offset)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = mlp_width(cfg)
        self.swiglu = cfg.activation == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.down_proj = nn.Linear(width, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary=None, cache=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rotary, cache))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is None: set it from the tokenizer before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.context_length, cfg.d_model), persistent=False)
        else:
            cos, sin = rotary_tables(cfg.context_length, cfg.d_model // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
        self.activation_checkpointing = enabled

    def new_kv_cache(self) -> list[dict]:
        """An empty key-value cache: one dict per block, filled by forward(..., kv_cache=cache)."""
        return [{} for _ in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list[dict] | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean next-token cross-entropy.

        With kv_cache, input_ids are the tokens at positions start_pos .. start_pos+T-1 and the cache holds
        the keys and values of the positions before them (it is extended in place).
        """
        length = input_ids.shape[1]
        end = start_pos + length
        if end > self.cfg.context_length:
            raise ValueError(f"sequence of {end} tokens exceeds model.context_length={self.cfg.context_length}")
        x = self.tok_emb(input_ids)
        rotary = None
        if self.cfg.pos_encoding == "learned":
            x = x + self.pos_emb(torch.arange(start_pos, end, device=input_ids.device))
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[start_pos:end].to(x.dtype)
        else:
            rotary = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            cache = kv_cache[i] if kv_cache is not None else None
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rotary, None, use_reentrant=False)
            else:
                x = block(x, rotary, cache)
        logits = self.lm_head(self.final_norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss
