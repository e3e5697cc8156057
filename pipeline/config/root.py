"""The whole config: PipelineConfig, every check a stage runs before it works, the run's names and directory, and
the fingerprint and flat view of a config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.base import ConfigError, validate_finite
from pipeline.config.cluster import (
    ClusterConfig,
    TrackingConfig,
    validate_cluster,
    validate_placement,
    validate_tracking,
)
from pipeline.config.data import DataConfig, validate_data
from pipeline.config.deepspeed import validate_deepspeed
from pipeline.config.eval import EvalConfig, validate_eval
from pipeline.config.model import ModelConfig, validate_model
from pipeline.config.parallel import ParallelConfig, validate_parallel
from pipeline.config.sweep import SweepConfig, validate_sweep_numbers
from pipeline.config.train import TrainConfig, validate_train


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Everything the pipeline writes goes below this directory.
    output_dir: str = "outputs"
    # Name of the training run; its checkpoints live in <output_dir>/runs/<run_name>.
    run_name: str = "${model.name}-${data.name}"


def unknown_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of attributes that a `+key=value` override added to the schema's dataclasses.

    Hydra lets `+key` append to a structured config, and OmegaConf.to_object then sets the stray key as an
    attribute of the dataclass; nothing reads it, so a misspelt `+trian.max_steps=5` would be silently ignored.
    """
    if not hasattr(obj, "__dataclass_fields__"):
        if isinstance(obj, list):
            return [k for i, item in enumerate(obj) for k in unknown_keys(item, f"{prefix}{i}.")]
        return []
    known = obj.__dataclass_fields__
    found = [f"{prefix}{name}" for name in vars(obj) if name not in known]
    for name in known:
        found += unknown_keys(getattr(obj, name), f"{prefix}{name}.")
    return found


def validate_known_keys(cfg: Any) -> None:
    stray = unknown_keys(cfg)
    if stray:
        raise ConfigError(
            f"unknown config key(s) {', '.join(stray)}: the schema (pipeline/config/) has no such field, so the "
            f"value would be ignored. Check the spelling (`pipeline train --cfg job` prints every key) and drop "
            f"the leading '+'."
        )


def validate(cfg: PipelineConfig) -> None:
    """Every cross-field check, run before any stage does work: those that hold wherever the job runs
    (validate_for_submit), then those that look at this machine (the placement, the data's input paths)."""
    validate_for_submit(cfg)
    validate_placement(cfg.cluster, cfg.parallel)
    validate_data(cfg.data, cfg.model)


def run_dir_for(cfg: PipelineConfig) -> Path:
    """<output_dir>/runs/<run_name>: the run's checkpoints, MLflow run id, exports and Ray Train files. run_name
    must be a plain name (pipeline.containment), so that the run directory lies below output_dir."""
    from pipeline.containment import plain_name

    return Path(cfg.output_dir) / "runs" / plain_name(resolved_run_name(cfg), "run_name")


def resolved_run_name(cfg: PipelineConfig) -> str:
    """cfg.run_name; its default template resolved when the config was built in Python rather than by Hydra."""
    return cfg.run_name.replace("${model.name}", cfg.model.name).replace("${data.name}", cfg.data.name)


def validate_names(cfg: PipelineConfig) -> None:
    """The names that become directory names below output_dir are plain names (run_name, data.name, the names of
    a mixture's sources): `run_name=../../x` must not write outside output_dir."""
    from pipeline.containment import plain_name

    plain_name(cfg.data.name, "data.name")  # first: run_name's default holds it
    for i, src in enumerate(cfg.data.mixture):
        plain_name(src.name, f"data.mixture.{i}.name")
    plain_name(resolved_run_name(cfg), "run_name")


def validate_for_submit(cfg: PipelineConfig) -> None:
    """The checks of `validate` that hold wherever the job runs: input paths and output_dir live on the
    cluster's storage, so `pipeline submit` does not look them up here (it checks them with its own rules)."""
    validate_known_keys(cfg)
    validate_names(cfg)
    validate_finite(cfg)
    validate_cluster(cfg.cluster)
    validate_tracking(cfg.tracking)
    validate_sweep_numbers(cfg.sweep)
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    validate_train(cfg.train, cfg.parallel, cfg.model)
    validate_deepspeed(cfg.parallel, cfg.train)
    validate_eval(cfg.eval)
    if cfg.train.downstream_interval_steps and not cfg.eval.tasks:
        raise ConfigError(f"train.downstream_interval_steps={cfg.train.downstream_interval_steps} but eval.tasks is "
                          f"empty: name the lm-eval tasks to score, e.g. eval.tasks=[shakespeare_next_line] (and "
                          f"eval.tasks_limit to bound them).")


def fingerprint(obj: Any, length: int = 12) -> str:
    """Stable short hash of a (nested) dataclass or dict, for naming outputs keyed by their config."""
    data = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.n_layer": 4, ...} from a nested dataclass, for logging as MLflow params; credentials in URIs
    (tracking.uri=http://user:secret@host, a storage URI's keys) come out as ***."""
    from pipeline.redaction import redact_values

    data = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact_values(value)
    return out
