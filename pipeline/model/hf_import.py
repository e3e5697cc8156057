"""A published Hugging Face checkpoint as the GPT's initial weights (model.init_from=<directory>).

The architectures the exporter writes (pipeline.evaluation.export), read back:

    GPT-2   (gpt2)   learned positions, LayerNorm, GELU (tanh), biases; Conv1D weights stored (in, out)
    Llama   (llama)  RoPE (theta), RMSNorm, SwiGLU, grouped-query attention; Mistral without a sliding window
    Qwen 3  (qwen3)  Llama with per-head RMSNorm of queries and keys
    BLOOM   (bloom)  ALiBi, LayerNorm after the embedding, fused query_key_value per head

The checkpoint's config.json sets the model's architecture and shape (pipeline.config.hf_shape; the context stays the
run's, at most the checkpoint's: GPT-2's first rows of its position table); its weights are read one
tensor at a time from its safetensors files (never pickles: a checkpoint is untrusted input), each checked against
the shape the config implies, and turned into this GPT's layout (imported_tensors): Llama's RoPE rotates halves of
each head where ours rotates interleaved pairs, so the rows of W_Q and W_K (and QK-norm's weights) are permuted
back; GPT-2's fused c_attn and BLOOM's per-head query_key_value are split. Export applies the inverse maps, so a
checkpoint imported and exported unchanged gives back every tensor exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pipeline.config import ConfigError, ModelConfig, kv_heads, mlp_width
from pipeline.config.hf_shape import max_context, read_hf_config
from pipeline.containment import contained_file, regular_file

__all__ = ["halves_order", "imported_tensors", "load_imported_weights"]

MAX_JSON_BYTES = 64 << 20  # an index of a few thousand tensor names is kilobytes


def halves_order(head_dim: int) -> torch.Tensor:
    """The permutation from our interleaved RoPE pairs (x[2i], x[2i+1]) to Llama's halves (x[i], x[i + d/2])."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


class SafetensorsReader:
    """The checkpoint's tensors by name, read one at a time from its safetensors files (model.safetensors, or the
    files model.safetensors.index.json names, each a regular file below the directory). A name the pipeline's
    export writes with the `transformer.` prefix is also found without it (the Hub's GPT-2 and BLOOM files). Every
    name asked for is recorded with its expected shape, so that `verify` can check them all from the files'
    headers before any tensor is read."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.expected: dict[str, tuple[int, ...]] = {}
        index = self.directory / "model.safetensors.index.json"
        fix = "give a directory that save_pretrained wrote (safetensors weights)"
        if index.is_file():
            regular_file(index, "model.init_from's index", fix)
            if index.stat().st_size > MAX_JSON_BYTES:
                raise ConfigError(f"model.init_from: {index} is larger than {MAX_JSON_BYTES} bytes: not an index.")
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"model.init_from: {index} has no weight_map.")
            self.files = {name: contained_file(self.directory, file, f"{index} names the file", fix)
                          for name, file in weight_map.items()}
        elif (self.directory / "model.safetensors").is_file():
            from safetensors import safe_open

            single = regular_file(self.directory / "model.safetensors", "model.init_from's weights", fix)
            with safe_open(str(single), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)  # noqa: SIM118 (safe_open is no dict)
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(p.name for p in self.directory.glob("*.pt"))
            raise ConfigError(
                f"model.init_from={self.directory}: no model.safetensors (or its index) there"
                + (f"; {', '.join(found)} are pickles, which can run code when loaded and are never read: convert "
                   f"them to safetensors (save_pretrained(..., safe_serialization=True)) where you trust them"
                   if found else "") + "."
            )

    def stored(self, name: str) -> str:
        """The name the files hold `name` under."""
        if name not in self.files and name.startswith("transformer.") and name[len("transformer."):] in self.files:
            return name[len("transformer."):]
        if name not in self.files:
            raise ConfigError(f"model.init_from={self.directory}: the weights lack {name}, which its config.json "
                              f"implies.")
        return name

    def expect(self, name: str, shape: tuple[int, ...]) -> None:
        self.expected[name] = tuple(shape)

    def verify(self) -> None:
        """Every expected tensor is in the files with its expected shape, read from the headers only."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in self.expected:
            by_file.setdefault(self.files[self.stored(name)], []).append(name)
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in names:
                    shape = tuple(handle.get_slice(self.stored(name)).get_shape())
                    if shape != self.expected[name]:
                        raise ConfigError(f"model.init_from={self.directory}: {name} has shape {shape}, its "
                                          f"config.json implies {self.expected[name]}.")

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[self.stored(name)]), framework="pt") as handle:
            return handle.get_tensor(self.stored(name)).float()


def imported_tensors(cfg: ModelConfig, directory: Path) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """(our parameter name, a function reading its tensor) for every parameter of the GPT of cfg (lm_head.weight
    too when tied: the embedding's), each read when called; the names and shapes of all of them checked first
    against the files' headers (on every rank: under ZeRO-3 only one reads the tensors)."""
    reader = SafetensorsReader(directory)
    tensors = list(_imported_tensors(cfg, directory, reader))
    reader.verify()
    return tensors


def _imported_tensors(cfg: ModelConfig, directory: Path,
                      reader: SafetensorsReader) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    kind = read_hf_config(Path(directory))["model_type"]
    d, f, n_head, n_kv = cfg.d_model, mlp_width(cfg), cfg.n_head, kv_heads(cfg)
    head_dim = d // n_head
    V = cfg.vocab_size

    def get(name, *shape):
        reader.expect(name, shape)
        return lambda: reader.get(name)

    def lm_head(embedding: str) -> Callable[[], torch.Tensor]:
        return get(embedding, V, d) if cfg.tie_embeddings else get("lm_head.weight", V, d)

    if kind == "gpt2":
        yield "tok_emb.weight", get("transformer.wte.weight", V, d)
        positions = get("transformer.wpe.weight", max_context(Path(directory)), d)
        yield "pos_emb.weight", lambda: positions()[: cfg.context_length].contiguous()  # the run's context
        for x in ("weight", "bias"):
            yield f"final_norm.{x}", get(f"transformer.ln_f.{x}", d)
        yield "lm_head.weight", lm_head("transformer.wte.weight")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for j, x in enumerate("qkv"):  # c_attn is (d, 3d): q, k, v columns
                yield p + f"attn.{x}_proj.weight", _part(get(h + "attn.c_attn.weight", d, 3 * d), j, d, transpose=True)
                yield p + f"attn.{x}_proj.bias", _part(get(h + "attn.c_attn.bias", 3 * d), j, d)
            for ours, theirs, shape in (("attn.o_proj", "attn.c_proj", (d, d)), ("mlp.up_proj", "mlp.c_fc", (d, f)),
                                        ("mlp.down_proj", "mlp.c_proj", (f, d))):
                yield p + f"{ours}.weight", _transposed(get(h + f"{theirs}.weight", *shape))
                yield p + f"{ours}.bias", get(h + f"{theirs}.bias", shape[1])
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                for x in ("weight", "bias"):
                    yield p + f"{ours}.{x}", get(h + f"{theirs}.{x}", d)
        return
    if kind == "bloom":
        yield "tok_emb.weight", get("transformer.word_embeddings.weight", V, d)
        for ours, theirs in (("emb_norm", "word_embeddings_layernorm"), ("final_norm", "ln_f")):
            for x in ("weight", "bias"):
                yield f"{ours}.{x}", get(f"transformer.{theirs}.{x}", d)
        yield "lm_head.weight", lm_head("transformer.word_embeddings.weight")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for j, x in enumerate("qkv"):
                yield p + f"attn.{x}_proj.weight", _bloom_part(get(h + "self_attention.query_key_value.weight", 3 * d, d), j, n_head)
                yield p + f"attn.{x}_proj.bias", _bloom_part(get(h + "self_attention.query_key_value.bias", 3 * d), j, n_head)
            for ours, theirs, shape in (("attn.o_proj", "self_attention.dense", (d, d)),
                                        ("mlp.up_proj", "mlp.dense_h_to_4h", (f, d)),
                                        ("mlp.down_proj", "mlp.dense_4h_to_h", (d, f))):
                yield p + f"{ours}.weight", get(h + f"{theirs}.weight", *shape)
                yield p + f"{ours}.bias", get(h + f"{theirs}.bias", shape[0])
            for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
                for x in ("weight", "bias"):
                    yield p + f"{ours}.{x}", get(h + f"{theirs}.{x}", d)
        return
    yield "tok_emb.weight", get("model.embed_tokens.weight", V, d)
    yield "final_norm.weight", get("model.norm.weight", d)
    yield "lm_head.weight", lm_head("model.embed_tokens.weight")
    inverse = torch.argsort(halves_order(head_dim))
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        yield p + "attn.q_proj.weight", _rows_per_head(get(h + "self_attn.q_proj.weight", d, d), n_head, inverse)
        yield p + "attn.k_proj.weight", _rows_per_head(get(h + "self_attn.k_proj.weight", n_kv * head_dim, d), n_kv, inverse)
        yield p + "attn.v_proj.weight", get(h + "self_attn.v_proj.weight", n_kv * head_dim, d)
        yield p + "attn.o_proj.weight", get(h + "self_attn.o_proj.weight", d, d)
        if cfg.qk_norm:
            for x in "qk":
                yield p + f"attn.{x}_norm.weight", _indexed(get(h + f"self_attn.{x}_norm.weight", head_dim), inverse)
        for x, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            yield p + f"mlp.{x}_proj.weight", get(h + f"mlp.{x}_proj.weight", *shape)
        yield p + "attn_norm.weight", get(h + "input_layernorm.weight", d)
        yield p + "mlp_norm.weight", get(h + "post_attention_layernorm.weight", d)


def _part(read, j: int, d: int, transpose: bool = False):
    def part():
        t = read()
        return (t[:, j * d:(j + 1) * d].T if transpose else t[j * d:(j + 1) * d]).contiguous()
    return part


def _transposed(read):
    return lambda: read().T.contiguous()


def _bloom_part(read, j: int, n_head: int):
    """Our q (j=0), k or v rows out of BLOOM's fused projection, which holds per head its q, k and v rows."""
    def part():
        t = read()
        per_head = t.view(n_head, 3, t.shape[0] // (3 * n_head), *t.shape[1:])
        return per_head[:, j].reshape(t.shape[0] // 3, *t.shape[1:]).contiguous()
    return part


def _rows_per_head(read, heads: int, order: torch.Tensor):
    def rows():
        t = read()
        return t.view(heads, -1, t.shape[-1])[:, order].reshape_as(t).contiguous()
    return rows


def _indexed(read, order: torch.Tensor):
    return lambda: read()[order].contiguous()


def load_imported_weights(model: torch.nn.Module, directory: Path, gather=None, write: bool = True) -> int:
    """Copy the checkpoint's tensors into the GPT's parameters one at a time; returns how many. gather(params), when
    given, is a context in which the parameters are whole (ZeRO-3: DeepSpeed's GatheredParameters, partitioned again
    on leaving it): then only the rank with `write` reads the files and writes. Every parameter must be covered."""
    from contextlib import nullcontext

    params = dict(model.named_parameters())  # a tied lm_head.weight is tok_emb.weight
    loaded = set()
    for name, read in imported_tensors(model.cfg, directory):
        if name == "lm_head.weight" and name not in params:
            continue
        param = params[name]
        with gather([param]) if gather is not None else nullcontext():
            if write:
                with torch.no_grad():
                    param.copy_(read())
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(f"model.init_from={directory}: nothing in the checkpoint maps to {', '.join(missing)}.")
    return len(loaded)
