"""Stopping at a step boundary when the job is about to be killed (Slurm, Kubernetes, `pipeline jobs stop`).

The driver turns SIGTERM/SIGUSR1 into a PREEMPT file in the run directory (PreemptionForwarder); every worker
checks the file and its own signals at each step boundary (PreemptionFlag), saves a checkpoint and stops; the
driver then exits with PREEMPTED_EXIT_CODE so that a scheduler requeues the job and train.resume=auto continues.

On nodes that share no disk the file reaches only the driver's node, where no rank may run, so under Ray the
request also travels through the cluster: the driver holds a named actor (PreemptRequests, one per launch) that
it raises when it is signalled or finds the file, which rank 0 polls, and which `pipeline preempt` raises from any
node of the cluster (a preStop hook on a pod whose disk holds no run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.containment import is_regular_file
from pipeline.train.run_spec import TrainOutcome

log = logging.getLogger(__name__)

PREEMPT_FILE = "PREEMPT"


# Exit code of a worker process that saved a checkpoint and stopped because it was asked to (EX_TEMPFAIL):
# a scheduler can requeue the job and train.resume=auto continues it.
PREEMPTED_EXIT_CODE = 75
# In a run directory while its driver trains (JSON: host, pid, pid_namespace, started, heartbeat): what `pipeline
# preempt` looks for. The driver rewrites it every HEARTBEAT_S; a file whose driver is gone (its pid dead on this
# host) or whose heartbeat is older than STALE_AFTER_S is the leftover of a driver killed without cleaning up
# (kill -9, a lost node), which `pipeline preempt` removes instead of waiting its whole grace period for it.
TRAINING_FILE = "TRAINING"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 6 * HEARTBEAT_S
# The Ray namespace and name prefix of the drivers' request actors; rank 0 polls its launch's every POLL_S.
RAY_NAMESPACE = "pipeline"
ACTOR_PREFIX = "preempt:"
POLL_S = 1.0


def actor_name(run_dir: Path | str, launch_id: str) -> str:
    """The request actor of a launch of the run in run_dir (its driver's and its workers' one decision)."""
    return f"{ACTOR_PREFIX}{Path(run_dir).name}:{launch_id}"


class PreemptRequests:
    """A launch's preemption request, held by its driver (a Ray actor without resources that dies with it)."""

    def __init__(self):
        self.asked_at: float | None = None

    def request(self) -> None:
        self.asked_at = self.asked_at or time.time()

    def requested(self) -> bool:
        return self.asked_at is not None


def _ray_ready() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _create_new(path: Path, text: str = "") -> None:
    """path as a new regular file holding text, never written through a symbolic link: whatever is planted at
    path is removed first (unlink removes a link, not its target), and O_EXCL | O_NOFOLLOW refuse anything that
    appears there meanwhile (FileExistsError)."""
    if os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def raise_flag(path: Path) -> None:
    """Create the PREEMPT file (kept as it is when it is a regular file already); never through a link."""
    if is_regular_file(path):
        return
    with contextlib.suppress(FileExistsError):  # created by another process meanwhile: the request stands
        _create_new(path)


def write_marker(path: Path, info: dict) -> None:
    """Replace the TRAINING file atomically (a reader sees the old or the new one, never none), never through
    a link: the new file is created beside it, then renamed over it (rename replaces a link, not its target)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _create_new(tmp, json.dumps(info))
    os.replace(tmp, path)


def read_marker(path: Path) -> dict | None:
    """The TRAINING file's JSON; None when it is not a regular file holding a JSON object (a link, a FIFO,
    garbage). Never follows a link, never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(65536)
    with contextlib.suppress(ValueError):
        info = json.loads(data)
        return info if isinstance(info, dict) else None
    return None


def pid_namespace() -> str:
    """This process's PID namespace (Linux), so that a pid is only judged where it means the same process: a
    container beside the driver's shares its host name but not its pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def stale_reason(marker: Path, now: float | None = None) -> str | None:
    """Why a TRAINING file no longer stands for a live driver, or None when it does."""
    info = read_marker(marker)
    try:
        pid, heartbeat = int(info["pid"]), float(info["heartbeat"] if "heartbeat" in info else info["started"])
    except (TypeError, KeyError, ValueError, OverflowError):  # info is None or lacks the fields
        return "it is not a regular file holding a driver's host, pid and heartbeat"
    if pid <= 0 or not math.isfinite(heartbeat):
        return f"it names the pid {pid} and the heartbeat {heartbeat}, which no driver writes"
    if info.get("host") == socket.gethostname() and info.get("pid_namespace") == pid_namespace() and not _alive(pid):
        return f"its driver, pid {pid} on this host, is gone"
    age = (time.time() if now is None else now) - heartbeat
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (a training driver refreshes it every {HEARTBEAT_S:.0f} s)"
    if age < -STALE_AFTER_S:  # a written future never ages: it would hold preempt for its whole wait
        return f"its heartbeat lies {-age:.0f} s in the future (another host's clock, or not a driver's)"
    return None


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (what Slurm and Kubernetes send before killing) or by a PREEMPT file in the run
    directory (how the driver passes a signal on to Ray workers); acted on at the next step boundary."""

    def __init__(self, run_dir: Path, actor: str | None = None):
        self.file = run_dir / PREEMPT_FILE
        self.signalled = self.asked_by_driver = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            # Not possible outside the main thread (Ray Train runs the loop in a thread): the file serves there.
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._handler)
        self._stop = threading.Event()
        if actor and _ray_ready():  # the driver's request actor (see the module docstring), polled in the background
            threading.Thread(target=self._poll, args=(actor,), name="preempt-poll", daemon=True).start()

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def _poll(self, name: str) -> None:
        import ray

        handle = None
        while not self._stop.wait(POLL_S) and not self.asked_by_driver:
            try:
                handle = handle or ray.get_actor(name, namespace=RAY_NAMESPACE)
                self.asked_by_driver = bool(ray.get(handle.requested.remote(), timeout=30))
            except Exception:  # no driver actor (a launch outside `pipeline train`), or its driver is gone
                handle = None

    def close(self) -> None:
        self._stop.set()

    def requested(self) -> bool:
        """This rank's own view: a signal, the driver's request, or any entry named PREEMPT (lexists: a link is
        never followed)."""
        return self.signalled or self.asked_by_driver or os.path.lexists(self.file)

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class PreemptionForwarder:
    """While Ray workers train, SIGTERM/SIGUSR1 to this driver (Slurm, Kubernetes) become a PREEMPT file in
    the run directory, which every worker checks at each step boundary; meanwhile a thread keeps the TRAINING
    file's heartbeat fresh (every heartbeat_s) for `pipeline preempt`.

    A Python handler of SIGUSR1 that was installed before (submitit's, which requeues a Hydra sweep point as a
    new Slurm job when the time limit nears) is not lost: `hand_over()`, called once the workers saved their
    checkpoint, passes it the signal. SIGTERM is not handed over: the handler before ours is Ray's, which
    would end the driver with code 15 instead of 75 (what the sbatch script requeues on)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, actor: str | None = None):
        self.flag, self.marker = run_dir / PREEMPT_FILE, run_dir / TRAINING_FILE
        self.heartbeat_s, self.actor_name, self.actor = heartbeat_s, actor, None
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self.started = time.time()
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: asking the workers to checkpoint and stop", signum)
        self.received = signum
        try:
            raise_flag(self.flag)
        except OSError as err:  # an exception here would surface in whatever the driver was doing
            log.error("could not write %s to stop the workers: %s", self.flag, err)

    def _write_marker(self) -> None:
        write_marker(self.marker, {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": pid_namespace(),
                                   "started": self.started, "heartbeat": time.time()})

    def _beat(self) -> None:
        beat = time.monotonic()
        while not self._stop.wait(min(POLL_S, self.heartbeat_s)):
            if self.actor is not None and os.path.lexists(self.flag):  # a signal, or `pipeline preempt` here
                with contextlib.suppress(Exception):  # Ray going away: the file still stands
                    self.actor.request.remote()
            if time.monotonic() - beat < self.heartbeat_s:
                continue
            beat = time.monotonic()
            try:
                self._write_marker()
            except OSError as err:  # a full disk must not stop training; preempt may then think the run stale
                log.warning("could not refresh %s: %s", self.marker, err)

    def __enter__(self) -> PreemptionForwarder:
        self.flag.unlink(missing_ok=True)  # a leftover from an earlier preemption must not stop this run
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        if self.actor_name and _ray_ready():
            import ray

            self.actor = ray.remote(num_cpus=0)(PreemptRequests).options(
                name=self.actor_name, namespace=RAY_NAMESPACE).remote()
        self._write_marker()
        self._beating = threading.Thread(target=self._beat, name="training-heartbeat", daemon=True)
        self._beating.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        if self.actor is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(self.actor)
        self.flag.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)

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


def _stale(run: Path) -> bool:
    """Whether the run's TRAINING file is a dead driver's leftover; such a file is removed (unlink: a link
    goes, not its target) and the run is not waited for."""
    reason = stale_reason(run / TRAINING_FILE)
    if reason is None:
        return False
    log.warning("run %s: its %s file is stale (%s): not waiting for it; removed it", run.name, TRAINING_FILE, reason)
    (run / TRAINING_FILE).unlink(missing_ok=True)
    return True


def _run_state(run: Path, asked: float) -> str | None:
    """saved | ended | stale once the run is safe (or nothing is left to wait for); None while it trains."""
    latest = run / "checkpoints" / "latest"
    if latest.is_file() and latest.stat().st_mtime >= asked:
        return "saved"
    if not os.path.lexists(run / TRAINING_FILE):
        return "ended"
    return "stale" if _stale(run) else None  # e.g. the driver was killed after the request


def _wait_for(runs: list[Path], asked: float, deadline: float, poll_s: float) -> dict[str, str]:
    """Each run's _run_state once it has one, or "timed out" at the deadline."""
    outcome: dict[str, str] = {}
    waiting = list(runs)
    while waiting:
        for run in list(waiting):
            state = _run_state(run, asked)
            if state:
                outcome[run.name] = state
                waiting.remove(run)
        if waiting and time.time() >= deadline:
            return outcome | {run.name: "timed out" for run in waiting}
        if waiting:
            time.sleep(poll_s)
    return outcome


def request_checkpoints(output_dir: Path, wait_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """`pipeline preempt`: ask every run under output_dir/runs that is training (its TRAINING file) to
    checkpoint and stop, as SIGTERM to its driver would (a PREEMPT file every rank checks at each step
    boundary), then wait up to wait_s until each has either written a checkpoint newer than the request or
    ended. For a Kubernetes preStop hook or any scheduler that can run a command before it kills a pod or a
    node: the pod then goes only once its runs are safe. A TRAINING file whose driver is gone is stale: it is
    removed, not waited for. Returns {run name: saved | ended | stale | timed out}."""
    asked = time.time()
    outcome: dict[str, str] = {}
    runs = []
    for run in sorted(p.parent for p in Path(output_dir).glob(f"runs/*/{TRAINING_FILE}")):
        if run.is_symlink():
            log.warning("runs/%s is a symbolic link: not following it", run.name)
        elif _stale(run):
            outcome[run.name] = "stale"
        else:
            raise_flag(run / PREEMPT_FILE)
            log.warning("asked run %s to checkpoint and stop", run.name)
            runs.append(run)
    outcome |= _wait_for(runs, asked, asked + wait_s, poll_s)
    for name, what in outcome.items():
        log.warning("run %s: %s", name, what)
    return outcome


def request_over_ray(address: str, wait_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """`pipeline preempt --ray`: ask every launch training on the Ray cluster this machine belongs to (its
    driver's PreemptRequests actor) to checkpoint and stop, then wait up to wait_s until each driver has let its
    actor go (its workers saved and stopped, or the run ended). For a node whose disk holds no run (nodes that
    share only an object store). Returns {run name: stopped | timed out}; {} without a cluster to reach."""
    import ray
    from ray.util import list_named_actors

    try:
        ray.init(address=address, namespace=RAY_NAMESPACE, logging_level="ERROR", log_to_driver=False)
    except Exception as err:  # no cluster here: the run files are the only way
        log.warning("no Ray cluster at %s to ask (%s)", address, err)
        return {}
    try:
        asked = [a["name"] for a in list_named_actors(all_namespaces=True)
                 if a["namespace"] == RAY_NAMESPACE and a["name"].startswith(ACTOR_PREFIX)]
        for name in list(asked):
            try:
                ray.get(ray.get_actor(name, namespace=RAY_NAMESPACE).request.remote(), timeout=30)
                log.warning("asked run %s on the Ray cluster to checkpoint and stop", _run_of(name))
            except Exception:  # its driver ended meanwhile
                asked.remove(name)
        outcome, deadline = {}, time.time() + wait_s
        while asked:
            for name in list(asked):
                try:
                    ray.get_actor(name, namespace=RAY_NAMESPACE)
                except ValueError:  # gone with its driver's PreemptionForwarder
                    outcome[_run_of(name)] = "stopped"
                    asked.remove(name)
            if asked and time.time() >= deadline:
                return outcome | {_run_of(name): "timed out" for name in asked}
            if asked:
                time.sleep(poll_s)
        return outcome
    finally:
        ray.shutdown()


def _run_of(name: str) -> str:
    """The run an actor_name names (what follows the prefix, up to the launch id)."""
    return name[len(ACTOR_PREFIX):].rsplit(":", 1)[0]


def preempt_main(argv: list[str]) -> int:
    """pipeline preempt <output_dir> [--wait SECONDS] [--ray [ADDRESS]]"""
    import argparse

    parser = argparse.ArgumentParser(prog="pipeline preempt", description=request_checkpoints.__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--wait", type=float, default=540.0, help="seconds to wait for the checkpoints")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="also ask the runs training on this Ray cluster (default address: auto, the cluster of "
                             "this node), for nodes whose disk holds no run")
    args = parser.parse_args(argv)
    started = time.time()
    outcome = request_checkpoints(Path(args.output_dir), args.wait)
    if args.ray:
        left = max(0.0, args.wait - (time.time() - started))
        for name, what in request_over_ray(args.ray, left).items():
            if name not in outcome:  # a run seen through its files here was waited for there
                outcome[name] = what
                log.warning("run %s: %s", name, what)
    return 1 if "timed out" in outcome.values() else 0
