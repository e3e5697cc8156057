"""A decoder-only transformer (GPT) built from ModelConfig, readable in one sitting.

    tokens -> tok_emb (+ pos_emb | + sinusoidal) -> n_layer x Block -> final_norm -> lm_head -> logits
    Block:  x = x + o_proj(attention(attn_norm(x)));  x = x + mlp(mlp_norm(x))         (pre-norm)

The model knows nothing of DeepSpeed, Ray or ranks. Tensor parallelism is applied from outside by DeepSpeed
AutoTP, which finds the layers by name, so the names are a contract:

    tok_emb, pos_emb (learned positions only), blocks.{i}.attn_norm, blocks.{i}.attn.{q,k,v,o}_proj,
    blocks.{i}.mlp_norm, blocks.{i}.mlp.{up,gate,down}_proj (gate: SwiGLU only), final_norm, lm_head

AutoTP splits q/k/v_proj and up/gate_proj by output columns and o_proj/down_proj by input rows, so a rank
holds n_head / tp heads and d_ff / tp hidden units. The forward passes therefore read head counts and widths
off the tensors they get, never off the config.

Sequence parallelism (Ulysses) is applied from outside too: set_sequence_shard gives the model a SequenceShard
(pipeline.model.sequence_parallel); forward then takes the whole window, builds its masks and positions from it and
runs the layers on the rank's slice, attention exchanging heads for positions with the other ranks of the group.

Generation keeps a key-value cache (see KVCache): forward(ids, kv_cache=cache, start_pos=p) takes the
tokens at absolute positions p .. p+T-1 and attends over the cached positions before them too.

Options (each off by default): grouped-query attention (n_kv_head: k/v_proj have n_kv_head heads, each shared
by n_head / n_kv_head query heads; the cache holds only those), QK-norm (blocks.{i}.attn.{q,k}_norm: RMSNorm of
each head's queries and keys, before the rotation), z-loss, ALiBi positions (a per-head linear bias on the
query-key distance, BLOOM's slopes), a norm after the token embedding (emb_norm, BLOOM's), µP
(mup_base_width: width-scaled initialisation here, the output multiplier in forward, the learning rates in
pipeline.train.optimizer) and document masking: a token attends only to the tokens of its own document and its position
counts from that document's start. A document's segment starts at the EOS before it (the separator the packed
windows carry), so a document is predicted exactly as it would be alone after an EOS.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig, kv_heads, mlp_width, norm_epsilon, width_multiplier
from pipeline.model.sequence_parallel import SequenceShard

__all__ = ["GPT", "KVCache", "LayerKVCache"]


# --- loss ------------------------------------------------------------------------------------------------

# Elements of fp32 logits that the loss materialises at a time when the logits are 16-bit (64 MiB).
LOSS_CHUNK_ELEMENTS = 2**24


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def _summed_log_z_squared(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.float().logsumexp(-1).square() * (targets != -100)).sum()


def mean_log_z_squared(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean of log^2 Z over the positions whose target is not -100, Z = sum(exp(logits)) (PaLM's z-loss term),
    in fp32 a chunk of rows at a time, each chunk checkpointed (as cross_entropy_fp32 does for 16-bit logits)."""
    flat, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = max(1, LOSS_CHUNK_ELEMENTS // flat.size(-1))
    total = sum(checkpoint(_summed_log_z_squared, chunk, chunk_targets, use_reentrant=False)
                for chunk, chunk_targets in zip(flat.split(rows), flat_targets.split(rows), strict=True))
    return total / (flat_targets != -100).sum().clamp(min=1)


def cross_entropy_and_log_z_squared(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean log^2 Z) over the targets that are not -100, from one log Z of fp32 logits."""
    log_z = logits.logsumexp(-1)
    valid = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    count = valid.sum().clamp(min=1)
    return ((log_z - picked) * valid).sum() / count, (log_z.square() * valid).sum() / count


def cross_entropy_fp32(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not -100, computed in fp32.

    fp32 logits go through F.cross_entropy as they are. 16-bit logits are upcast a chunk of rows at a time,
    each chunk checkpointed: no full-size fp32 copy of the logits (nor its fp32 log-softmax) is kept for the
    backward pass, which recomputes a chunk's; the gradient reaching the logits is 16-bit like them. At b x s x
    V = 8 x 2048 x 50304 that is 6.6 GB of fp32 copies (copy, saved log-softmax, gradient) not held."""
    flat, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if flat.dtype == torch.float32:
        return F.cross_entropy(flat, flat_targets, ignore_index=-100)
    rows = max(1, LOSS_CHUNK_ELEMENTS // flat.size(-1))
    total = sum(checkpoint(_summed_cross_entropy, chunk, chunk_targets, use_reentrant=False)
                for chunk, chunk_targets in zip(flat.split(rows), flat_targets.split(rows), strict=True))
    return total / (flat_targets != -100).sum().clamp(min=1)


# --- positions -------------------------------------------------------------------------------------------
# Computed per call in fp32 from the absolute positions: no buffers that a bf16 cast would round, and the
# cached and uncached paths see exactly the same numbers.


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """sin/cos of increasing wavelength (Vaswani et al. 2017): positions.shape + (dim,), even columns sin, odd
    columns cos."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * inv_freq  # (..., ceil(dim / 2))
    table = torch.zeros(*positions.shape, dim, device=positions.device)
    table[..., 0::2] = torch.sin(angles)
    table[..., 1::2] = torch.cos(angles[..., : dim // 2])
    return table


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles (Su et al. 2021) for positions (T,) or (B, T): each (T, head_dim / 2), or
    (B, 1, T, head_dim / 2) to broadcast over heads."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    if positions.dim() == 2:
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022) as BLOOM computes them: the geometric sequence
    2^(-8 i / n) for a power of two n, interleaved with the next power's odd terms otherwise."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != n_head:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** i for i in range(1, 2 * (n_head - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def document_segments(input_ids: torch.Tensor, eos_id: int, start_pos: int,
                      previous_start: torch.Tensor | None) -> torch.Tensor:
    """(B, T) absolute position at which each token's document segment starts: at the last EOS at or before it
    (an EOS opens the next document's segment), else previous_start (B,) (a cache's open segment) or 0."""
    positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=input_ids.device)
    opened = torch.where(input_ids == eos_id, positions, -1)
    if previous_start is not None:
        opened = torch.cat([previous_start[:, None].to(opened), opened], dim=1)
    starts = opened.cummax(dim=1).values.clamp(min=0)
    return starts[:, 1:] if previous_start is not None else starts


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of x (B, H, T, head_dim) by their positions' angles."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """module and its descendants in the order Module.apply visits them: each module after its children."""
    for child in module.children():
        yield from _children_first(child)
    yield module


# --- key-value cache -------------------------------------------------------------------------------------


class LayerKVCache:
    """Keys and values of one attention layer for the positions seen so far, each (B, H_kv_local, T, head_dim):
    under grouped-query attention the cache holds the n_kv_head key/value heads, not n_head. The buffers are
    allocated once, for `capacity` positions (the model's context), on the first extend, and filled in place: no
    copy of the cache per generated token."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.length = 0
        self.k_buffer: torch.Tensor | None = None
        self.v_buffer: torch.Tensor | None = None
        # Document masking: the absolute position where each row's last document segment started (B,).
        self.segment_start: torch.Tensor | None = None

    @property
    def k(self) -> torch.Tensor | None:
        return None if self.k_buffer is None else self.k_buffer[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self.v_buffer is None else self.v_buffer[:, :, : self.length]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; return those of every position so far."""
        end = self.length + k.shape[2]
        if self.k_buffer is None or end > self.k_buffer.shape[2]:
            size = max(end, self.capacity or 0)
            k_buffer, v_buffer = k.new_empty(*k.shape[:2], size, k.shape[3]), v.new_empty(*v.shape[:2], size, v.shape[3])
            if self.k_buffer is not None:  # more positions than the capacity: copied once into a larger buffer
                k_buffer[:, :, : self.length], v_buffer[:, :, : self.length] = self.k, self.v
            self.k_buffer, self.v_buffer = k_buffer, v_buffer
        self.k_buffer[:, :, self.length : end] = k
        self.v_buffer[:, :, self.length : end] = v
        self.length = end
        return self.k, self.v


KVCache = list[LayerKVCache]  # one per block; make one with GPT.new_kv_cache()


# --- layers ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in fp32."""

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
        return RMSNorm(cfg.d_model, norm_epsilon(cfg))
    return nn.LayerNorm(cfg.d_model, eps=norm_epsilon(cfg), bias=cfg.bias)


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (its fast path); eager elsewhere (forward only on CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex(q, k, v, block_mask=block_mask)


def document_block_mask(segment_start: torch.Tensor):
    """FlexAttention's block mask of causal attention within document segments (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segment_start.shape

    def within_document(b, h, q, kv):
        return (kv <= q) & (kv >= segment_start[b, q])

    return create_block_mask(within_document, batch, None, length, length, device=segment_start.device)


def allowed_keys(query_pos: torch.Tensor, n_keys: int, segment_start: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask (.., T, n_keys): query at absolute position p sees keys at positions <= p and, with
    document segments (B, T), >= the start of its segment."""
    keys = torch.arange(n_keys, device=query_pos.device)
    allowed = keys <= query_pos[..., None]
    if segment_start is not None:
        allowed = allowed & (keys >= segment_start[..., None])
    return allowed


# Queries per block when a document mask is materialised (SDPA on CPU, or attention_kernel=sdpa): a window longer
# than this attends a block of queries at a time, each over the keys up to its last position, so no mask of the
# whole window exists. torch's CPU SDPA turns a boolean mask into a float one and keeps it for the backward pass
# (measured: 1 GiB per layer at 16k positions); each block is therefore checkpointed (its mask rebuilt from the
# segment starts and its attention recomputed in the backward pass), and only a block's mask exists at a time.
QUERY_BLOCK = 1024


class DocumentMask:
    """Causal attention within document segments, materialised a block of queries at a time: queries at absolute
    positions query_pos (T,), keys at positions 0 .. n_keys - 1, segment_start (B, T)."""

    def __init__(self, query_pos: torch.Tensor, n_keys: int, segment_start: torch.Tensor):
        self.query_pos, self.n_keys, self.segment_start = query_pos, n_keys, segment_start

    def rows(self, lo: int, hi: int, n_keys: int | None = None) -> torch.Tensor:
        """The boolean mask (B, 1, hi - lo, n_keys) of queries lo .. hi - 1 over the first n_keys keys."""
        keys = self.n_keys if n_keys is None else n_keys
        return allowed_keys(self.query_pos[lo:hi], keys, self.segment_start[:, lo:hi])[:, None]

    def keys_before(self, hi: int) -> int:
        """How many keys queries up to hi - 1 may see: those up to the last one's position (no host sync: the
        queries are the last T of the n_keys positions)."""
        return self.n_keys - (len(self.query_pos) - hi)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor,
                      segment_start: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA of q over the first k.shape[2] keys under the document mask built from query_pos and segment_start."""
    mask = allowed_keys(query_pos, k.shape[2], segment_start)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attend_in_query_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask,
                           dropout_p: float) -> torch.Tensor:
    """SDPA of q (B, H, T, d) over k, v under a document mask; above QUERY_BLOCK queries a block of them at a
    time, each over the keys it may see and checkpointed: the same numbers as one call with the whole mask
    (masked keys weigh exactly 0), no mask larger than a block's, and the masked upper triangle skipped."""
    length = q.shape[2]
    if length <= QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.rows(0, length), dropout_p=dropout_p)
    blocks = []
    for lo in range(0, length, QUERY_BLOCK):
        hi = min(length, lo + QUERY_BLOCK)
        keys = mask.keys_before(hi)
        blocks.append(checkpoint(_masked_attention, q[:, :, lo:hi], k[:, :, :keys], v[:, :, :keys],
                                 mask.query_pos[lo:hi], mask.segment_start[:, lo:hi], dropout_p,
                                 use_reentrant=False))
    return torch.cat(blocks, dim=2)


class CausalSelfAttention(nn.Module):
    """Multi-head attention softmax(QK^T / sqrt(d_k) [+ ALiBi bias]) V with a causal (or document) mask, then
    W_O; K and V with n_kv_head heads (grouped-query attention) and optional QK-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        kv_width = kv_heads(cfg) * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, norm_epsilon(cfg))
            self.k_norm = RMSNorm(self.head_dim, norm_epsilon(cfg))
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rotary=None, cache: LayerKVCache | None = None,
                mask: torch.Tensor | None = None, shard: SequenceShard | None = None) -> torch.Tensor:
        """mask: None for plain causal attention, else a boolean (allowed) or additive float mask that
        broadcasts to (B, H, T, keys). With a sequence shard x holds this rank's slice of the window's positions
        and mask is the whole window's (for this rank's heads)."""
        batch, length, _ = x.shape
        # Head counts are read off the tensors: n_head / tp and n_kv_head / tp under tensor parallelism.
        q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.extend(k, v)
        if shard is not None:  # (B, T/N, H, d) -> every position, H/N heads -> back (Ulysses)
            out = shard.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               lambda q, k, v: self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           mask).transpose(1, 2))
            return self.o_proj(out.reshape(batch, length, -1))
        out = self.attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """softmax(QK^T / sqrt(d_k) [+ bias]) V of q (B, H, T, d) over k, v (B, H_kv, keys, d): the queries are the
        last T of the keys' positions."""
        length = q.shape[2]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # query head h reads key/value head h // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, DocumentMask):
            return attend_in_query_blocks(q, k, v, mask, dropout_p)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention block mask
            return flex_attention(q, k, v, mask)
        if mask is None and k.shape[2] == length:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        if mask is None:
            # Queries are the last `length` of k.shape[2] positions: query i sees keys up to offset + i.
            offset = k.shape[2] - length
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=offset)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MLP(nn.Module):
    """GELU: down(gelu(up(x))).  SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = mlp_width(cfg)
        self.swiglu = cfg.activation == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.down_proj = nn.Linear(width, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # GPT-2's tanh approximation


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary=None, cache: LayerKVCache | None = None,
                mask: torch.Tensor | None = None, shard: SequenceShard | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rotary, cache, mask, shard))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        """init_weights=False leaves GPT-2's initialisation to the caller (init_steps), e.g. one that holds only
        partitions of the parameters (ZeRO-3) and gathers each step's parameters first."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "model.vocab_size is None: set it before building the model (the pipeline takes it from the "
                "prepared data set's tokenizer; in code, ModelConfig(vocab_size=...))."
            )
        if cfg.document_mask and cfg.eos_id is None:
            raise ValueError(
                "model.document_mask needs model.eos_id, the token that separates documents (the pipeline takes "
                "it from the prepared data set's tokenizer; in code, ModelConfig(eos_id=...))."
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.embedding_norm:
            self.emb_norm = make_norm(cfg)
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.activation_checkpointing = False
        self.sequence_shard: SequenceShard | None = None
        if init_weights:
            for _, init in self.init_steps():
                init()

    def init_steps(self) -> list[tuple[list[nn.Parameter], Callable[[], None]]]:
        """GPT-2's initialisation as ordered steps, each with the parameters it writes: every Linear and
        Embedding weight ~ N(0, init_std) and every Linear bias 0, module by module in Module.apply's order
        (children first); then the residual projections again with init_std / sqrt(2 n_layer) (two per block),
        so that the residual stream's variance does not grow with depth. Run in order, the steps draw the same
        random numbers whoever runs them. Under µP the hidden matrices (every Linear in the blocks) take
        init_std / sqrt(m): variance 1 / fan_in relative to the base width."""
        hidden_std = self.cfg.init_std / math.sqrt(width_multiplier(self.cfg))
        hidden = {id(m) for m in self.blocks.modules() if isinstance(m, nn.Linear)}
        steps = []
        for module in _children_first(self):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                params = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
                std = hidden_std if id(module) in hidden else self.cfg.init_std
                steps.append((params, functools.partial(self._init_module, module, std)))
        residual_std = hidden_std / math.sqrt(2 * self.cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                steps.append(([param], functools.partial(nn.init.normal_, param, mean=0.0, std=residual_std)))
        return steps

    @staticmethod
    def _init_module(module: nn.Linear | nn.Embedding, std: float) -> None:
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
        self.activation_checkpointing = enabled

    def set_sequence_shard(self, shard: SequenceShard | None) -> None:
        """Train and score this rank's slice of each window (Ulysses sequence parallelism, see
        pipeline.model.sequence_parallel): forward still takes the whole window's ids and targets, returns the
        slice's logits and the whole window's loss. Generation (a key-value cache) always runs unsharded."""
        self.sequence_shard = shard

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets of the positions whose logits forward returns (this rank's slice under sequence
        parallelism)."""
        shard = self.sequence_shard
        return targets if shard is None else targets[:, shard.positions(targets.shape[1])]

    def uses_flex(self, input_ids: torch.Tensor, kv_cache) -> bool:
        """Whether document masking runs on FlexAttention (model.attention_kernel; auto: on CUDA), which serves
        the training forward: not the cached steps of generation, ALiBi's biases or dropout."""
        kernel = self.cfg.attention_kernel
        if kernel == "sdpa" or kv_cache is not None or self.cfg.pos_encoding == "alibi" or self.cfg.dropout:
            return False
        return kernel == "flex" or input_ids.is_cuda

    def new_kv_cache(self) -> KVCache:
        """An empty key-value cache for up to context_length positions, filled in place by
        forward(..., kv_cache=cache)."""
        return [LayerKVCache(self.cfg.context_length) for _ in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T), the mean next-token cross-entropy over every
        position whose target is not -100 (else None); in training mode with model.z_loss > 0 the loss adds
        z_loss x mean log^2 Z (the cross-entropy alone is loss - z_loss x last_z_loss).

        input_ids hold the tokens at absolute positions start_pos .. start_pos+T-1. With kv_cache (from
        new_kv_cache()), the cache must hold exactly the start_pos positions before them; it is extended in
        place, so the next call passes start_pos + T. Without a cache start_pos must be 0.
        """
        length = input_ids.shape[1]
        end = start_pos + length
        cached = kv_cache[0].length if kv_cache else 0
        if start_pos != cached:
            raise ValueError(
                f"start_pos={start_pos} but the key-value cache holds {cached} positions: pass "
                f"start_pos={cached} (the number of tokens already fed through this cache)."
            )
        if end > self.cfg.context_length:
            raise ValueError(
                f"positions {start_pos}..{end - 1} exceed model.context_length={self.cfg.context_length}: "
                f"feed at most the last {self.cfg.context_length} tokens."
            )
        positions = torch.arange(start_pos, end, device=input_ids.device)
        # Sequence parallelism: masks and positions from the whole window, the layers on this rank's slice.
        shard = self.sequence_shard if kv_cache is None else None
        mine = slice(None) if shard is None else shard.positions(length)
        x = self.tok_emb(input_ids[:, mine])
        if self.cfg.embedding_norm:
            x = self.emb_norm(x)
        mask, segment_start = None, None
        if self.cfg.document_mask:
            previous = kv_cache[0].segment_start if kv_cache and cached else None
            segment_start = document_segments(input_ids, self.cfg.eos_id, start_pos, previous)
            if self.uses_flex(input_ids, kv_cache):
                mask = document_block_mask(segment_start)
            else:
                mask = DocumentMask(positions, end, segment_start)  # (B, 1, T, keys), a block of rows at a time
        if self.cfg.pos_encoding == "alibi":
            distance = positions[:, None] - torch.arange(end, device=input_ids.device)  # (T, keys)
            slopes = alibi_slopes(self.cfg.n_head).to(input_ids.device)
            if shard is not None:  # the heads this rank attends with
                slopes = slopes[shard.heads(self.cfg.n_head)]
            bias = -slopes[:, None, None] * distance  # (H, T, keys)
            allowed = mask.rows(0, length) if mask is not None else allowed_keys(positions, end, None)
            mask = bias.masked_fill(~allowed, float("-inf")).to(x.dtype)
        if segment_start is not None:
            positions = positions - segment_start  # (B, T): positions count from each document's start
        positions = positions[..., mine]
        rotary = None
        if self.cfg.pos_encoding == "learned":
            x = x + self.pos_emb(positions)
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.cfg.d_model).to(x.dtype)
        elif self.cfg.pos_encoding == "rotary":
            rotary = rotary_angles(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if kv_cache is not None:
                x = block(x, rotary, kv_cache[i], mask)
            elif self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rotary, None, mask, shard, use_reentrant=False)
            else:
                x = block(x, rotary, None, mask, shard)
        if kv_cache is not None and segment_start is not None:
            kv_cache[0].segment_start = segment_start[:, -1]
        logits = self.lm_head(self.final_norm(x))
        if self.cfg.mup_base_width is not None:
            logits = logits * (1.0 / width_multiplier(self.cfg))  # µP's output multiplier
        if targets is None:
            return logits, None
        targets = targets[:, mine]
        if not (self.cfg.z_loss and self.training):
            return logits, self._window_mean(cross_entropy_fp32(logits, targets), targets, shard)
        if logits.dtype == torch.float32:  # one pass: the cross-entropy and z-loss share log Z
            loss, log_z_squared = cross_entropy_and_log_z_squared(logits, targets)
        else:
            loss, log_z_squared = cross_entropy_fp32(logits, targets), mean_log_z_squared(logits, targets)
        loss, log_z_squared = self._window_mean(loss, targets, shard), self._window_mean(log_z_squared, targets, shard)
        self.last_z_loss = log_z_squared.detach()  # read by the training loop, which logs it
        return logits, loss + self.cfg.z_loss * log_z_squared

    @staticmethod
    def _window_mean(local_mean: torch.Tensor, targets: torch.Tensor, shard: SequenceShard | None) -> torch.Tensor:
        """A mean over the targets' positions; under sequence parallelism over the whole window's (see
        SequenceShard.window_mean)."""
        return local_mean if shard is None else shard.window_mean(local_mean, (targets != -100).sum())
