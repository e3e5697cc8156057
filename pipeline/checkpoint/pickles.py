"""Refusing checkpoint files that would run code when unpickled.

DeepSpeed's loaders use torch.load(weights_only=False): a crafted file runs code on load. Before anything
unpickles a checkpoint, its pickles are scanned (not the tensor data) for Python globals beyond tensors, plain
data and DeepSpeed's own state classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.checkpoint.layout import CheckpointError

# Environment variable naming further Python globals (module.Name, comma-separated) that a checkpoint the
# user trusts may pickle, e.g. one written by another DeepSpeed version.
TRUSTED_GLOBALS_ENV = "PIPELINE_TRUSTED_PICKLE_GLOBALS"


def deepspeed_pickle_classes() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_pickles(tag_dir: Path) -> None:
    """Refuse a checkpoint whose pickles name any Python global beyond tensors, plain data and DeepSpeed's
    own state classes, before anything unpickles it: DeepSpeed's loaders use torch.load(weights_only=False),
    and a crafted file runs code on load. Scanning reads only the pickles, not the tensor data."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_pickle_classes()}
    allowed |= {name.strip() for name in os.environ.get(TRUSTED_GLOBALS_ENV, "").split(",") if name.strip()}
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
        except Exception as err:  # not a torch.save zip file at all
            raise CheckpointError(f"checkpoint file {path} is not a readable torch file ({err}): resume from "
                                  f"another checkpoint") from err
        if unknown:
            raise CheckpointError(
                f"checkpoint file {path} pickles Python objects this pipeline does not write ({', '.join(unknown)}); "
                f"loading it could run arbitrary code, so it is refused. If you trust its source, allow them with "
                f"{TRUSTED_GLOBALS_ENV}={','.join(unknown)}."
            )
