"""The PREEMPT and TRAINING files of a run directory against leftovers and planted links: a driver killed with
SIGKILL leaves a TRAINING file that `pipeline preempt` (a KubeRay preStop hook) must not wait its whole grace
period for, and a symbolic link planted as PREEMPT or TRAINING must never be written through."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.containment import is_regular_file
from pipeline.train.preemption import (
    PREEMPT_FILE,
    STALE_AFTER_S,
    TRAINING_FILE,
    PreemptionFlag,
    PreemptionForwarder,
    request_checkpoints,
)

# A driver as `pipeline train` runs it, without Ray: the forwarder around a long wait.
DRIVER = """
import sys, time
from pathlib import Path
from pipeline.train.preemption import PreemptionForwarder
with PreemptionForwarder(Path(sys.argv[1]), heartbeat_s=float(sys.argv[2])):
    print("training", flush=True)
    time.sleep(600)
"""
SECRET = "do not overwrite\n"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "out" / "runs" / "tiny-shakespeare"
    run.mkdir(parents=True)
    return run


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the run directory that a planted link points at."""
    target = tmp_path / "outside.txt"
    target.write_text(SECRET)
    return target


def start_driver(run_dir: Path, heartbeat_s: float = 5.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir), str(heartbeat_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "training", line + proc.stdout.read()
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def preempt(output_dir: Path, wait_s: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "preempt", str(output_dir), "--wait", str(wait_s)],
                         capture_output=True, text=True, timeout=wait_s + 120)
    return out, time.time() - started


def test_a_killed_drivers_training_file_is_stale_and_not_waited_for(run_dir):
    driver = start_driver(run_dir)
    kill(driver)  # SIGKILL: no cleanup, the TRAINING file stays
    assert (run_dir / TRAINING_FILE).is_file()
    out, elapsed = preempt(run_dir.parents[1], 60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"is stale (its driver, pid {driver.pid} on this host, is gone)" in out.stderr, out.stderr[-3000:]
    assert elapsed < 20, f"waited {elapsed:.0f} s for a dead driver"
    assert not os.path.lexists(run_dir / TRAINING_FILE) and not os.path.lexists(run_dir / PREEMPT_FILE)


def test_a_live_driver_keeps_its_heartbeat_fresh_and_is_waited_for(run_dir):
    driver = start_driver(run_dir, heartbeat_s=0.2)
    try:
        first = json.loads((run_dir / TRAINING_FILE).read_text())["heartbeat"]
        time.sleep(1.0)
        assert json.loads((run_dir / TRAINING_FILE).read_text())["heartbeat"] > first
        out, _ = preempt(run_dir.parents[1], 3)
        assert out.returncode == 1 and "run tiny-shakespeare: timed out" in out.stderr, out.stderr[-3000:]
        assert (run_dir / PREEMPT_FILE).is_file()  # asked; a real run would checkpoint and stop
    finally:
        kill(driver)


def write_training(run_dir: Path, host: str, pid: int, heartbeat: float) -> None:
    (run_dir / TRAINING_FILE).write_text(json.dumps({"host": host, "pid": pid, "pid_namespace": "",
                                                     "started": heartbeat, "heartbeat": heartbeat}))


def test_a_heartbeat_older_than_a_few_intervals_is_stale_on_any_host(run_dir):
    """A driver on another machine (its pid means nothing here) is judged by its heartbeat alone."""
    write_training(run_dir, "another-node", 1, time.time() - STALE_AFTER_S - 5)
    assert request_checkpoints(run_dir.parents[1], wait_s=60, poll_s=0.1) == {"tiny-shakespeare": "stale"}
    assert not (run_dir / TRAINING_FILE).exists()
    write_training(run_dir, "another-node", 1, time.time())  # fresh: waited for
    assert request_checkpoints(run_dir.parents[1], wait_s=0.5, poll_s=0.1) == {"tiny-shakespeare": "timed out"}


def test_a_driver_killed_while_preempt_waits_is_not_waited_for(run_dir):
    """The request was made, then the driver died before it checkpointed (OOM, a node lost): preempt notices."""
    driver = start_driver(run_dir)
    try:
        import threading

        threading.Timer(1.0, driver.kill).start()
        started = time.time()
        outcome = request_checkpoints(run_dir.parents[1], wait_s=60, poll_s=0.2)
        assert outcome == {"tiny-shakespeare": "stale"} and time.time() - started < 10
    finally:
        kill(driver)


def test_a_planted_training_link_or_fifo_is_stale_and_its_target_untouched(run_dir, outside):
    live = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time()}
    outside.write_text(json.dumps(live))  # what the link points at looks like a live driver: still not trusted
    (run_dir / TRAINING_FILE).symlink_to(outside)
    assert request_checkpoints(run_dir.parents[1], wait_s=60, poll_s=0.1) == {"tiny-shakespeare": "stale"}
    assert not os.path.lexists(run_dir / TRAINING_FILE) and outside.read_text() == json.dumps(live)
    assert not os.path.lexists(run_dir / PREEMPT_FILE)
    os.mkfifo(run_dir / TRAINING_FILE)  # reading a FIFO would block preempt forever
    assert request_checkpoints(run_dir.parents[1], wait_s=60, poll_s=0.1) == {"tiny-shakespeare": "stale"}


def test_preempt_never_writes_through_a_planted_preempt_link(run_dir, outside):
    driver = start_driver(run_dir, heartbeat_s=0.2)
    try:
        (run_dir / PREEMPT_FILE).symlink_to(outside)
        out, _ = preempt(run_dir.parents[1], 1)
        assert "asked run tiny-shakespeare" in out.stderr, out.stderr[-3000:]
        assert not (run_dir / PREEMPT_FILE).is_symlink() and (run_dir / PREEMPT_FILE).is_file()
        assert outside.read_text() == SECRET and outside.stat().st_size == len(SECRET)
    finally:
        kill(driver)


def test_the_drivers_signal_never_writes_through_a_planted_preempt_link(run_dir, outside):
    """SIGTERM to a real driver: the PREEMPT file it writes replaces the link, the link's target is untouched."""
    driver = start_driver(run_dir)
    try:
        (run_dir / PREEMPT_FILE).symlink_to(outside)
        before = outside.stat().st_mtime_ns
        driver.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        while not is_regular_file(run_dir / PREEMPT_FILE) and time.time() < deadline:  # the link goes, then the file
            time.sleep(0.05)
        assert is_regular_file(run_dir / PREEMPT_FILE)
        assert outside.read_text() == SECRET and outside.stat().st_mtime_ns == before
    finally:
        kill(driver)


def test_the_training_file_replaces_planted_links_instead_of_following_them(run_dir, tmp_path, outside):
    other = tmp_path / "other.txt"
    other.write_text(SECRET)
    (run_dir / TRAINING_FILE).symlink_to(outside)
    (run_dir / f".{TRAINING_FILE}.{os.getpid()}.tmp").symlink_to(other)  # the name its rewrite goes through
    with PreemptionForwarder(run_dir, heartbeat_s=0.1):
        time.sleep(0.3)
        assert json.loads((run_dir / TRAINING_FILE).read_text())["pid"] == os.getpid()
        assert not (run_dir / TRAINING_FILE).is_symlink()
    assert outside.read_text() == SECRET and other.read_text() == SECRET
    assert not os.path.lexists(run_dir / TRAINING_FILE)


def test_the_workers_flag_sees_a_link_without_following_it(run_dir, outside):
    """Any entry named PREEMPT is a request (lexists): a dangling link counts; nothing is read through it."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        flag = PreemptionFlag(run_dir)
        assert not flag.requested()
        (run_dir / PREEMPT_FILE).symlink_to(run_dir / "nowhere")
        assert flag.requested()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert outside.read_text() == SECRET


@pytest.mark.parametrize("info", [{"heartbeat": float("nan")}, {"heartbeat": 1e300}, {"pid": -5},
                                  {"heartbeat": "soon"}])
def test_a_training_file_with_a_crafted_heartbeat_or_pid_is_stale_not_a_wait_or_a_crash(tmp_path, info):
    """NaN and far-future heartbeats never age, and a negative pid made psutil raise: each is stale, said so."""
    from pipeline.train.preemption import TRAINING_FILE, pid_namespace, stale_reason

    marker = tmp_path / TRAINING_FILE
    base = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": pid_namespace(),
            "started": time.time(), "heartbeat": time.time()}
    marker.write_text(json.dumps({**base, **info}))
    assert stale_reason(marker) is not None
    marker.write_text(json.dumps(base))
    assert stale_reason(marker) is None  # the honest marker of a live driver
