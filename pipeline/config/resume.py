"""What of the model and the optimisation a checkpoint records as its math, by each field's `resume` metadata."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig


def resume_fields(train: TrainConfig, model: ModelConfig) -> dict[str, dict[str, Any]]:
    """{"model": ..., "train": ...}: the settings of the model and the optimisation that change the numbers a run
    computes, by each field's `resume` metadata (MATH, FREE, LENGTH, later). A checkpoint records them in its math
    config and a resume compares them, so the result must stay byte-identical for the configs of older checkpoints."""
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
        counted[spec.name] = values[spec.name]
    return counted
