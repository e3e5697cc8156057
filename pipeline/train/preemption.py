"""Stopping at a step boundary when the job is about to be killed (Slurm, Kubernetes, `pipeline jobs stop`).

The driver turns SIGTERM/SIGUSR1 into a PREEMPT file in the run directory (PreemptionForwarder); every worker
checks the file and its own signals at each step boundary (PreemptionFlag), saves a checkpoint and stops; the
driver then exits with PREEMPTED_EXIT_CODE so that a scheduler requeues the job and train.resume=auto continues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.files import write_atomic
from pipeline.train.job import TrainOutcome

log = logging.getLogger(__name__)

PREEMPT_FILE = "PREEMPT"


# Exit code of a worker process that saved a checkpoint and stopped because it was asked to (EX_TEMPFAIL):
# a scheduler can requeue the job and train.resume=auto continues it.
PREEMPTED_EXIT_CODE = 75
# In a run directory while its driver trains (JSON: host, pid, started): what `pipeline preempt` looks for.
TRAINING_FILE = "TRAINING"


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (what Slurm and Kubernetes send before killing) or by a PREEMPT file in the run
    directory (how the driver passes a signal on to Ray workers); acted on at the next step boundary."""

    def __init__(self, run_dir: Path):
        self.file = run_dir / PREEMPT_FILE
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            # Not possible outside the main thread (Ray Train runs the loop in a thread): the file serves there.
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def any_rank(self, device: torch.device) -> bool:
        local = self.signalled or self.file.exists()
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class PreemptionForwarder:
    """While Ray workers train, SIGTERM/SIGUSR1 to this driver (Slurm, Kubernetes) become a PREEMPT file in
    the run directory, which every worker checks at each step boundary.

    A Python handler of SIGUSR1 that was installed before (submitit's, which requeues a Hydra sweep point as a
    new Slurm job when the time limit nears) is not lost: `hand_over()`, called once the workers saved their
    checkpoint, passes it the signal. SIGTERM is not handed over: the handler before ours is Ray's, which
    would end the driver with code 15 instead of 75 (what the sbatch script requeues on)."""

    def __init__(self, run_dir: Path):
        self.flag = run_dir / PREEMPT_FILE
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: asking the workers to checkpoint and stop", signum)
        self.received = signum
        self.flag.touch()

    def __enter__(self) -> PreemptionForwarder:
        self.flag.unlink(missing_ok=True)  # a leftover from an earlier preemption must not stop this run
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        write_atomic(self.flag.with_name(TRAINING_FILE),
                     json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.flag.unlink(missing_ok=True)
        self.flag.with_name(TRAINING_FILE).unlink(missing_ok=True)

    def hand_over(self) -> None:
        """Call the SIGUSR1 handler that was there before, if the signal received was SIGUSR1 and the handler
        a Python function."""
        previous = self.previous.get(signal.SIGUSR1) if self.received == signal.SIGUSR1 else None
        if callable(previous):
            log.warning("checkpoint saved; passing signal %d on to the handler installed before (%s)",
                        self.received, getattr(previous, "__qualname__", previous))
            previous(self.received, None)


class Preempted(SystemExit):
    """Training saved a checkpoint and stopped on request; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, outcome: TrainOutcome):
        log.warning("training was preempted at step %d; checkpoint %s; resume with the same command",
                    outcome.final_step, outcome.checkpoint)
        super().__init__(PREEMPTED_EXIT_CODE)


def request_checkpoints(output_dir: Path, wait_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """`pipeline preempt`: ask every run under output_dir/runs that is training (its TRAINING file) to
    checkpoint and stop, as SIGTERM to its driver would (a PREEMPT file every rank checks at each step
    boundary), then wait up to wait_s until each has either written a checkpoint newer than the request or
    ended. For a Kubernetes preStop hook or any scheduler that can run a command before it kills a pod or a
    node: the pod then goes only once its runs are safe. Returns {run name: saved | ended | timed out}."""
    runs = sorted(p.parent for p in Path(output_dir).glob(f"runs/*/{TRAINING_FILE}"))
    asked = time.time()
    for run in runs:
        (run / PREEMPT_FILE).touch()
        log.warning("asked run %s to checkpoint and stop", run.name)
    outcome: dict[str, str] = {}
    deadline = asked + wait_s
    while len(outcome) < len(runs):
        for run in runs:
            if run.name in outcome:
                continue
            latest = run / "checkpoints" / "latest"
            if latest.is_file() and latest.stat().st_mtime >= asked:
                outcome[run.name] = "saved"
            elif not (run / TRAINING_FILE).exists():
                outcome[run.name] = "ended"
        if len(outcome) < len(runs):
            if time.time() >= deadline:
                outcome.update({r.name: "timed out" for r in runs if r.name not in outcome})
                break
            time.sleep(poll_s)
    for name, what in outcome.items():
        log.warning("run %s: %s", name, what)
    return outcome


def preempt_main(argv: list[str]) -> int:
    """pipeline preempt <output_dir> [--wait SECONDS]"""
    import argparse

    parser = argparse.ArgumentParser(prog="pipeline preempt", description=request_checkpoints.__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--wait", type=float, default=540.0, help="seconds to wait for the checkpoints")
    args = parser.parse_args(argv)
    outcome = request_checkpoints(Path(args.output_dir), args.wait)
    return 1 if "timed out" in outcome.values() else 0
