"""Stopping at a step boundary when the job is about to be killed (Slurm, Kubernetes, `pipeline jobs stop`).

The driver turns SIGTERM/SIGUSR1 into a PREEMPT file in the run directory (PreemptionForwarder); every worker
checks the file and its own signals at each step boundary (PreemptionFlag), saves a checkpoint and stops; the
driver then exits with PREEMPTED_EXIT_CODE so that a scheduler requeues the job and train.resume=auto continues.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train.job import TrainOutcome

log = logging.getLogger(__name__)

PREEMPT_FILE = "PREEMPT"


# Exit code of a worker process that saved a checkpoint and stopped because it was asked to (EX_TEMPFAIL):
# a scheduler can requeue the job and train.resume=auto continues it.
PREEMPTED_EXIT_CODE = 75


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
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.flag.unlink(missing_ok=True)

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
