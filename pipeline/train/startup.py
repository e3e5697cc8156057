"""Where the wall time of a training run goes before its first step and after its last.

The driver knows when its process started, when it launched the workers and when they returned; rank 0 knows
(TrainOutcome.timeline, wall clock) when it started, when the process group and then the engine were ready,
when its first and last steps ended. The phases between them:

    before_launch      driver process start -> workers launched: imports, Ray, config and data checks, MLflow
    worker_group       launched -> rank 0 running: Ray Train's controller, worker processes, their imports
    process_group      torch.distributed / DeepSpeed communication set-up
    model              the weights built and initialised (under ZeRO-3 partitioned as they are built: zero.Init)
    engine             DeepSpeed's engine and optimizer, the checkpoint loaded (on a resume), callbacks
    first_step         the first step, one-off costs included (allocations, lazy initialisation)
    steps              the remaining steps (callbacks included: logging, validation, checkpoints)
    teardown           last step -> workers returned: final checkpoint, process group and Ray Train shutdown

overhead_s is the run's wall time less the time its steps would take at the steady rate (the mean of the
steps after the first): what a longer run would still pay once.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PHASES = [
    ("before_launch", "process_start", "launched"),
    ("worker_group", "launched", "worker_started"),
    ("process_group", "worker_started", "distributed_ready"),
    ("model", "distributed_ready", "model_built"),
    ("engine", "model_built", "engine_ready"),
    ("first_step", "engine_ready", "first_step_done"),
    ("steps", "first_step_done", "last_step_done"),
    ("teardown", "last_step_done", "returned"),
]


def process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def startup_phases(timeline: dict[str, float]) -> dict[str, float]:
    """Seconds per phase (those whose two ends are known) and overhead_s, from a timeline of wall-clock times
    that holds the driver's process_start, launched and returned beside the worker's marks."""
    phases = {f"{name}_s": timeline[end] - timeline[start]
              for name, start, end in PHASES if start in timeline and end in timeline}
    steps = int(timeline.get("steps", 0))
    if "steps_s" in phases and "process_start" in timeline and "returned" in timeline:
        steady_step = phases["steps_s"] / (steps - 1) if steps > 1 else phases.get("first_step_s", 0.0)
        phases["overhead_s"] = timeline["returned"] - timeline["process_start"] - steps * steady_step
    return phases


def report_startup(timeline: dict[str, float], tracker=None, step: int = 0) -> dict[str, float]:
    """Log the phases (to MLflow as tags startup/<phase>_s: seconds of this launch, a constant of it rather than
    a curve; a resumed run's tags hold its latest launch) and return them. `step` is kept for callers."""
    phases = startup_phases(timeline)
    if phases:
        log.info("wall time by phase: %s", ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in phases.items()))
        if tracker is not None:
            tracker.set_tags({f"startup/{k}": f"{v:.3f}" for k, v in phases.items()})
    return phases
