"""Registers the typed schema (pipeline.config.PipelineConfig) with Hydra's ConfigStore.

conf/config.yaml lists `pipeline_schema` first in its defaults, so every YAML file and every command-line
override is merged into the dataclasses: an unknown key or a value of the wrong type stops at composition.
"""

from hydra.core.config_store import ConfigStore

from pipeline.config import PipelineConfig

_registered = False


def register_schema() -> None:
    global _registered
    if not _registered:
        ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
        _registered = True
