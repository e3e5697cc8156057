"""eval.*: validation metrics, samples, exports and benchmark tasks of a trained checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.base import Choice, ConfigError, choice, non_negative, positive


class ExportDtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class EvalConfig:
    """Validation metrics and samples from a trained checkpoint."""

    # Which checkpoints `pipeline evaluate` scores, each logged at its own step: latest | all (every complete tag
    # of the run) | a tag (step_00000200, or a tag directory).
    checkpoint: str = "latest"
    # Validation tokens to score; null scores the whole validation split.
    max_tokens: int | None = None
    batch_size: int = 16
    num_samples: int = 3
    prompt: str = "ROMEO:"
    max_new_tokens: int = 120
    # 0 means greedy decoding.
    temperature: float = 0.8
    # 0 disables top-k.
    top_k: int = 50
    # 1.0 disables nucleus sampling.
    top_p: float = 0.95
    seed: int = 0
    # `pipeline export`: the Hugging Face directory to write (null: <run dir>/hf/<checkpoint tag>).
    export_dir: str | None = None
    # fp32 | bf16: the exported weights' dtype (converted one tensor at a time).
    export_dtype: ExportDtype = ExportDtype.fp32
    # Safetensors files of at most this size, with model.safetensors.index.json when there are several.
    export_shard_size: str = "5GB"
    # lm-eval-harness tasks run on the exported model by `pipeline evaluate` (needs lm-eval installed).
    tasks: list[str] = field(default_factory=list)
    # At most this many examples per task (null: all).
    tasks_limit: int | None = None


EXPORT_DTYPES = ExportDtype.values()


def validate_eval(ev: EvalConfig) -> None:
    positive("eval.batch_size", ev.batch_size)
    if ev.temperature < 0:
        raise ConfigError(f"eval.temperature={ev.temperature} must be >= 0 (0 is greedy).")
    if ev.top_k < 0:
        raise ConfigError(f"eval.top_k={ev.top_k} must be >= 0 (0 disables top-k).")
    if not 0.0 < ev.top_p <= 1.0:
        raise ConfigError(f"eval.top_p={ev.top_p} must be in (0, 1].")
    if ev.max_tokens is not None:
        positive("eval.max_tokens", ev.max_tokens)
    non_negative("eval.num_samples", ev.num_samples, "0: no samples")
    positive("eval.max_new_tokens", ev.max_new_tokens)
    non_negative("eval.seed", ev.seed, "a seed is a non-negative integer")
    if ev.tasks_limit is not None:
        positive("eval.tasks_limit", ev.tasks_limit)
    choice("eval.export_dtype", ev.export_dtype, ExportDtype)
    if ev.checkpoint in ("", None):
        raise ConfigError("eval.checkpoint is empty: set latest, all, or a checkpoint tag (step_00000200).")
