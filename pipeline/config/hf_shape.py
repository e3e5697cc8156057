"""What model a Hugging Face checkpoint is (model.init_from): the ModelConfig fields its config.json sets.

The architectures the exporter writes (pipeline.evaluation.export) are read back: GPT-2 (gpt2), Llama (llama;
Mistral without a sliding window), Qwen 3 (qwen3: Llama with QK-norm), BLOOM (bloom). Anything else, or an option
this GPT does not have (RoPE scaling, sliding windows, biases in Llama, post-norm), is refused naming the setting.
The context stays the run's, at most the checkpoint's (max_context). The weights are pipeline.model.hf_import's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from pipeline.config.base import ConfigError
from pipeline.config.model import Activation, ModelConfig, Norm, PosEncoding, validate_model
from pipeline.containment import regular_file

# The model fields a checkpoint sets (its shape and architecture); the others (context_length for ALiBi, dropout,
# document masking, z-loss, ...) stay the run's.
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "bias", "tie_embeddings",
                "pos_encoding", "embedding_norm", "rope_theta", "qk_norm", "norm", "activation", "norm_eps")
SUPPORTED = ("gpt2", "llama", "mistral", "qwen3", "bloom")


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.init_from={directory}: no config.json there; give a local Hugging Face model "
                          f"directory (config.json and *.safetensors, as save_pretrained writes them).")
    regular_file(path, f"model.init_from={directory}: config.json", "replace it with a regular file")
    if path.stat().st_size > 1 << 20:
        raise ConfigError(f"model.init_from: {path} is larger than 1 MiB: not a model's config.json.")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.init_from: {path} is not JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ConfigError(f"model.init_from: {path} holds no JSON object.")
    return config


def _int(config: dict, key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"model.init_from: {path}/config.json has {key}={value!r}; a positive integer is needed.")
    return value


def _rope_theta(config: dict, path: Path) -> float:
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or parameters
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in (None, "default"):
        raise ConfigError(f"model.init_from: {path}/config.json scales RoPE ({kind!r}): this GPT's RoPE has no "
                          f"scaling; import a checkpoint without rope_scaling.")
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"model.init_from: {path}/config.json has rope_theta={theta!r}.")
    return float(theta)


def _eps(config: dict, key: str, path: Path) -> float:
    eps = config.get(key)
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError(f"model.init_from: {path}/config.json has {key}={eps!r}; a norm epsilon in (0, 1) is "
                          f"needed.")
    return float(eps)


def model_fields(directory: Path) -> dict[str, Any]:
    """The ModelConfig fields the checkpoint in `directory` sets (SHAPE_FIELDS), from its config.json; ConfigError
    naming the setting for an architecture or option this GPT does not have."""
    path = Path(directory)
    config = read_hf_config(path)
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ConfigError(f"model.init_from: {path}/config.json is model_type={kind!r}; this pipeline imports "
                          f"{', '.join(SUPPORTED)} (the architectures its exporter writes).")
    tied = bool(config.get("tie_word_embeddings", kind == "gpt2" or kind == "bloom"))
    vocab = _int(config, "vocab_size", path)
    if kind == "gpt2":
        d = _int(config, "n_embd", path)
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"model.init_from: {path}/config.json has activation_function={act!r}; this GPT's "
                              f"GELU is the tanh approximation (gelu_new).")
        for key, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("reorder_and_upcast_attn", False)):
            if config.get(key, plain) != plain:
                raise ConfigError(f"model.init_from: {path}/config.json sets {key}={config[key]!r}; this GPT's "
                                  f"attention is GPT-2's plain scaled attention ({key}={plain}).")
        if config.get("n_inner") is not None:
            _int(config, "n_inner", path)
        return dict(vocab_size=vocab, n_layer=_int(config, "n_layer", path), n_head=_int(config, "n_head", path),
                    n_kv_head=None, d_model=d, d_ff=config.get("n_inner") or 4 * d, bias=True, tie_embeddings=tied,
                    pos_encoding="learned", embedding_norm=False, rope_theta=10000.0, qk_norm=False,
                    norm="layernorm", activation="gelu", norm_eps=_eps(config, "layer_norm_epsilon", path))
    if kind == "bloom":
        d = _int(config, "hidden_size", path)
        if config.get("apply_residual_connection_post_layernorm"):
            raise ConfigError(f"model.init_from: {path}/config.json applies the residual after the layer norm; "
                              f"this GPT is pre-norm.")
        return dict(vocab_size=vocab, n_layer=_int(config, "n_layer", path), n_head=_int(config, "n_head", path),
                    n_kv_head=None, d_model=d, d_ff=4 * d, bias=True, tie_embeddings=tied, pos_encoding="alibi",
                    embedding_norm=True, rope_theta=10000.0, qk_norm=False, norm="layernorm", activation="gelu",
                    norm_eps=_eps(config, "layer_norm_epsilon", path))
    # Llama, Mistral (without a sliding window), Qwen 3
    if config.get("sliding_window") is not None and (kind == "mistral" or config.get("use_sliding_window")):
        raise ConfigError(f"model.init_from: {path}/config.json uses sliding-window attention (sliding_window="
                          f"{config['sliding_window']}): this GPT attends over the whole context; import a model "
                          f"without a sliding window.")
    d, heads = _int(config, "hidden_size", path), _int(config, "num_attention_heads", path)
    head_dim = config.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ConfigError(f"model.init_from: {path}/config.json has head_dim={head_dim} x {heads} heads != "
                          f"hidden_size={d}: this GPT's heads split d_model.")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConfigError(f"model.init_from: {path}/config.json sets {key}; this GPT's Llama has no biases.")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"model.init_from: {path}/config.json has hidden_act={config.get('hidden_act')!r}; "
                          f"SwiGLU needs silu.")
    return dict(vocab_size=vocab, n_layer=_int(config, "num_hidden_layers", path), n_head=heads,
                n_kv_head=_int(config, "num_key_value_heads", path, heads), d_model=d,
                d_ff=_int(config, "intermediate_size", path), bias=False, tie_embeddings=tied, pos_encoding="rotary",
                embedding_norm=False, rope_theta=_rope_theta(config, path), qk_norm=kind == "qwen3", norm="rmsnorm",
                activation="swiglu", norm_eps=_eps(config, "rms_norm_eps", path))


def max_context(directory: Path) -> int | None:
    """The longest context the checkpoint was made for (GPT-2's position table, Llama's max_position_embeddings);
    None for BLOOM, whose ALiBi has no limit."""
    path = Path(directory)
    config = read_hf_config(path)
    if config.get("model_type") == "bloom":
        return None
    return _int(config, "n_positions" if config.get("model_type") == "gpt2" else "max_position_embeddings", path)


def with_checkpoint_shape(model: ModelConfig) -> ModelConfig:
    """The model config with the shape and architecture of the checkpoint model.init_from names (model_fields);
    the context stays, if the checkpoint was made for it."""
    if model.mup_base_width is not None:
        raise ConfigError(
            f"model.mup_base_width={model.mup_base_width} with model.init_from: µP multiplies the logits by "
            f"1/m, so the imported model would not be the checkpoint; set model.mup_base_width=null."
        )
    fields = model_fields(Path(model.init_from))
    longest = max_context(Path(model.init_from))
    if longest is not None and model.context_length > longest:
        raise ConfigError(
            f"model.context_length={model.context_length} is longer than model.init_from's checkpoint was made for "
            f"({longest} positions): set model.context_length (and data.context_length) to at most {longest}."
        )
    choices = {"pos_encoding": PosEncoding, "norm": Norm, "activation": Activation}
    imported = dataclasses.replace(model, **{k: choices[k](v) if k in choices else v for k, v in fields.items()})
    validate_model(imported)
    return imported


def refuse_disagreeing_overrides(model: ModelConfig, overridden: dict[str, Any]) -> None:
    """A command-line override of a field the checkpoint sets (model.<field>=value) must agree with it."""
    if model.init_from is None:
        return
    fields = model_fields(Path(model.init_from))
    for name, value in overridden.items():
        value = getattr(value, "value", value)  # a choice as its string
        if name in fields and fields[name] != value:
            raise ConfigError(
                f"model.{name}={value} disagrees with model.init_from={model.init_from}, whose config.json sets "
                f"{name}={fields[name]}: the checkpoint's weights have its shape; drop the override."
            )
