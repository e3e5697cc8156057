"""What of the model and the optimisation a checkpoint records as its math, by each field's `resume` metadata."""

from __future__ import annotations

from dataclasses import asdict, fields
from enum import Enum
from typing import Any

from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig


def resume_fields(train: TrainConfig, model: ModelConfig) -> dict[str, dict[str, Any]]:
    """{"model": ..., "train": ...}: the settings of the model and the optimisation that change the numbers a run
    computes, by each field's `resume` metadata (MATH, FREE, LENGTH, later). A checkpoint records them in its math
    config and a resume compares them, so the result must stay byte-identical for the configs of older checkpoints.
    Plain data only (a Choice as its string): a checkpoint stores it, and loading pickles of the pipeline's own
    classes is refused (pipeline.checkpoint.pickles)."""
    return {"model": _counted(model, train.schedule), "train": _counted(train, train.schedule)}


def _counted(section: Any, schedule: str) -> dict[str, Any]:
    values = asdict(section)
    counted = {}
    for spec in fields(section):
        kind = spec.metadata["resume"]
        if kind == "free" or (kind == "length" and schedule == "constant"):
            continue
        if kind == "later" and values[spec.name] == spec.metadata["before"]:
            continue
        value = values[spec.name]
        counted[spec.name] = value.value if isinstance(value, Enum) else value
    return counted
