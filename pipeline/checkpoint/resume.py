"""Where a training run resumes from, decided on the driver before any worker starts: the checkpoint that
train.resume names, refused when it was trained with other math or at a ZeRO stage DeepSpeed cannot convert,
and converted to a universal checkpoint when the parallel layout changed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checkpoint.layout import (
    checkpoint_root,
    find_tag,
    latest_complete,
    read_marker,
    verify_checkpoint,
)
from pipeline.checkpoint.pickles import check_pickles
from pipeline.checkpoint.store_sync import pull_latest_checkpoint, push_checkpoint
from pipeline.checkpoint.universal import needs_universal, to_universal, zero_stage_change_supported
from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.config import ConfigError, ParallelConfig, TrainConfig, wsd_decay_start

log = logging.getLogger(__name__)


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: saved -> current' for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def is_wsd_branch(saved: dict[str, Any], current: dict[str, Any], step: int) -> bool:
    """Whether a checkpoint at `step` of a WSD run starts another WSD run that differs only in its length:
    both schedules are still at their stable peak there (before either decay starts), so every step up to the
    checkpoint computed what the new run would have computed, and resuming is exact."""
    def without_length(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "train": {k: v for k, v in config.get("train", {}).items() if k != "max_steps"}}

    train_saved, train_now = saved.get("train", {}), current.get("train", {})
    if train_now.get("schedule") != "wsd" or config_differences(without_length(saved), without_length(current)):
        return False
    return 0 <= step <= min(wsd_decay_start(train_saved["max_steps"], train_saved["decay_fraction"]),
                            wsd_decay_start(train_now["max_steps"], train_now["decay_fraction"]))


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint tag directory that train.resume names (auto: the latest complete one, if any; a run or
    checkpoints directory: its latest complete tag)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_complete(root)
    tag_dir = find_tag(Path(resume))
    read_marker(tag_dir)
    return tag_dir


@dataclass
class ResumeSource:
    """What the workers load: `checkpoint` (None: start from scratch) and whether it is a universal one (another
    parallel layout). Decided here once, on the driver; a worker group that Ray restarts after a failure
    continues from its launch's own newest checkpoint instead (pipeline.train.worker.resume_point)."""

    checkpoint: Path | None = None
    universal: bool = False


def resume_source(train: TrainConfig, parallel: ParallelConfig, run_dir: Path, math_config: dict[str, Any],
                  mirror: Mirror = NO_MIRROR) -> ResumeSource:
    """Resolve train.resume, refuse a checkpoint trained with different math or at a ZeRO stage DeepSpeed cannot
    convert, and convert it to a universal checkpoint when the parallel layout changed. The run's `mirror` first
    brings the store's newest checkpoint here (auto: a run on a fresh node resumes from the store) and then gets
    the universal conversion (for the workers of other nodes)."""
    if train.resume == "auto":
        pull_latest_checkpoint(mirror, run_dir)
    tag_dir = resolve_resume(train.resume, checkpoint_root(run_dir))
    if tag_dir is None:
        return ResumeSource()
    marker = verify_checkpoint(tag_dir)  # a missing or truncated file is named here, before workers start
    check_pickles(tag_dir)  # and a file that would run code when DeepSpeed unpickles it is refused
    saved = marker.get("client_state", {}).get("math_config")
    differences = config_differences(saved, math_config) if saved is not None else []
    if differences and is_wsd_branch(saved, math_config, int(marker.get("client_state", {}).get("step", -1))):
        log.info("starting a WSD decay branch from %s (the stable phase of a run of %d steps) to step %d",
                 tag_dir, saved["train"]["max_steps"], math_config["train"]["max_steps"])
        differences = []
    if differences and not train.allow_config_change:
        raise ConfigError(
            f"the checkpoint {tag_dir} was trained with a different config:\n  " + "\n  ".join(differences)
            + "\nresume with the same values, start a new run (run_name=... or train.resume=none), or pass "
            "train.allow_config_change=true to resume anyway."
        )
    if differences:
        log.warning("resuming %s despite config changes: %s", tag_dir, "; ".join(differences))
    saved_stage = marker.get("zero_stage", 0)
    if not zero_stage_change_supported(saved_stage, parallel.zero_stage):
        raise ConfigError(
            f"the checkpoint {tag_dir} was saved at ZeRO stage {saved_stage}, and DeepSpeed cannot resume it at "
            f"parallel.zero_stage={parallel.zero_stage} (only stages 1 and 2 convert into each other): resume with "
            f"parallel.zero_stage={saved_stage} (any data-parallel size and tensor-parallel degree work), or start "
            f"a new run (run_name=... or train.resume=none)."
        )
    if needs_universal(marker, parallel.num_workers, parallel.tensor_parallel, parallel.zero_stage):
        # Elastic resume: another data-parallel size or ZeRO stage than the checkpoint was saved with.
        if train.optimizer == "muon":
            raise ConfigError(
                f"the checkpoint {tag_dir} was saved at world size {marker['world_size']}, tensor parallel "
                f"{marker.get('tensor_parallel', 1)}, ZeRO-{saved_stage}, and resuming it in another layout needs "
                f"DeepSpeed's universal conversion, which reads Adam's moments of every parameter and fails on "
                f"Muon's momentum buffers (train.optimizer=muon; KeyError 'exp_avg' in DeepSpeed 0.19.8): resume with the saved layout (parallel.num_workers, "
                f"parallel.tensor_parallel, parallel.zero_stage), or start a new run (run_name=... or "
                f"train.resume=none)."
            )
        universal = to_universal(tag_dir, run_dir)
        push_checkpoint(mirror, universal, latest=False)
        log.info("resuming %s (saved at world size %d, ZeRO-%d) at world size %d, ZeRO-%d through %s",
                 tag_dir, marker["world_size"], saved_stage, parallel.num_workers, parallel.zero_stage, universal)
        return ResumeSource(universal, universal=True)
    return ResumeSource(tag_dir)
