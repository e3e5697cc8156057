"""The one way a PipelineConfig is made from the Hydra tree in conf/ and overrides.

conf/ ships inside the package as pipeline.conf (pyproject.toml), so every entry point finds it from any working
directory: the CLI (through `hydra.main`, which adds multirun and launchers), `pipeline submit` and
`torchrun -m pipeline.launch` (through Hydra's compose API). All of them turn the composed node into a
validated PipelineConfig with `to_pipeline_config`.

The schema (pipeline.config.PipelineConfig) is registered with Hydra's ConfigStore as `pipeline_schema`, which
conf/config.yaml lists first in its defaults: every YAML file and every override is merged into the
dataclasses, so an unknown key or a value of the wrong type stops at composition, as does a value outside the
choices of a fixed-choice field (a pipeline.config.Choice enum: train.schedule, parallel.precision, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import (
    ConfigError,
    PipelineConfig,
    validate,
    validate_for_submit,
    validate_known_keys,
    validate_model,
    validate_parallel,
)
from pipeline.config.hf_shape import with_checkpoint_shape
from pipeline.hub import local_checkpoint

CONFIG_MODULE = "pipeline.conf"
CONFIG_NAME = "config"
HYDRA_VERSION_BASE = "1.3"
# For hydra.main: the config tree as a package resource.
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"

_registered = False
# OmegaConf's refusal of a value outside an Enum field's members.
_NOT_A_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")


def register_schema() -> None:
    global _registered
    if not _registered:
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
        _registered = True


def compose_node(overrides: list[str], with_hydra: bool = False):
    """The composed (unvalidated) Hydra DictConfig of the overrides; with_hydra keeps the `hydra` node (the
    launcher and sweeper settings)."""
    from hydra import compose, initialize_config_module

    register_schema()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=HYDRA_VERSION_BASE):
        return compose(config_name=CONFIG_NAME, overrides=overrides, return_hydra_config=with_hydra)


def compose_error(err: Exception) -> ConfigError:
    """What Hydra or OmegaConf refused, as one line naming the override or the field (and, for a fixed-choice field,
    the values it takes) instead of their report over several lines."""
    bad = err if getattr(err, "full_key", None) else err.__cause__
    key = getattr(bad, "full_key", None)
    detail = str(bad).strip().splitlines()[0] if bad is not None and str(bad).strip() else ""
    found = _NOT_A_CHOICE.fullmatch(detail)
    if key and found:
        return ConfigError(f"the overrides do not compose: {key}={found[1]!r} is not one of {found[2]}: set {key} to "
                           f"one of them.")
    what = " ".join(str(err).split()) or type(err).__name__
    if key and bad is not err:
        what = f"{what}: {key}: {detail}"
    elif key:
        what = f"{key}: {detail}"
    return ConfigError(f"the overrides do not compose: {what}")


def to_pipeline_config(node, stage: str = "run") -> PipelineConfig:
    """Hydra DictConfig -> validated PipelineConfig.

    `params` only needs a valid model, `plan` a valid model and layout. `submit` checks what holds wherever the job runs (input paths and
    output_dir live on the cluster's storage, so they are neither looked up nor made absolute here). Every
    other stage validates the whole config, with output_dir made absolute.
    """
    from omegaconf import OmegaConf

    try:
        OmegaConf.set_readonly(node, False)
        if stage != "submit":
            node.output_dir = str(Path(node.output_dir).expanduser().resolve())
        cfg = OmegaConf.to_object(node)
    except Exception as err:  # OmegaConf's type and interpolation errors
        raise compose_error(err) from err
    if stage != "submit":  # a submitted job composes again on the cluster, which fetches there
        config_only = stage in ("params", "plan")
        cfg.model.init_from = local_checkpoint(cfg.model.init_from, "model.init_from", cfg.output_dir, config_only)
        cfg.data.tokenizer.hf = local_checkpoint(cfg.data.tokenizer.hf, "data.tokenizer.hf", cfg.output_dir, config_only)
    if cfg.model.init_from is not None:
        # The checkpoint's shape, validated below as any model; a submitted job's directory may be the cluster's
        # alone, where the job composes its config again.
        if stage != "submit":
            cfg.model.init_from = str(Path(cfg.model.init_from).expanduser().resolve())
        if stage != "submit" or (Path(cfg.model.init_from) / "config.json").is_file():
            cfg.model = with_checkpoint_shape(cfg.model)
    if stage in ("params", "plan"):
        validate_known_keys(cfg)
        validate_model(cfg.model)
        if stage == "plan":
            validate_parallel(cfg.parallel, cfg.model)
    elif stage == "submit":
        validate_for_submit(cfg)
    else:
        validate(cfg)
    return cfg


def compose_config(overrides: list[str], stage: str = "run") -> PipelineConfig:
    """compose_node + to_pipeline_config; anything Hydra refuses (the override grammar, unknown keys, wrong
    types) is a ConfigError naming it."""
    try:
        node = compose_node(overrides)
    except Exception as err:  # Hydra's override grammar, unknown keys, wrong types, values outside a choice
        raise compose_error(err) from err
    return to_pipeline_config(node, stage)
