"""SIGTERM to `pipeline train` (as Slurm or Kubernetes send it): every rank checkpoints at the next step
boundary, the process exits with code 75, and the same command resumes the run to its end."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from test_end_to_end import TINY

from pipeline.checkpoint.layout import latest_complete

pytestmark = pytest.mark.distributed


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline.cli", "train", *TINY, "train.max_steps=60", "train.log_interval_steps=5",
            "train.eval_interval_steps=0", f"output_dir={out}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    seen_step, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"step (\d+)/60", line)
        if match and int(match.group(1)) >= 10:
            seen_step = int(match.group(1))
            break
    assert seen_step, "".join(lines)[-3000:]
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, rest[-4000:]
    assert time.time() - signalled < 60
    tag = latest_complete(out / "runs" / "tiny-shakespeare" / "checkpoints")
    saved_step = int(tag.name.split("_")[1])
    assert seen_step <= saved_step < 60

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {tag}" in resumed.stdout + resumed.stderr
    assert latest_complete(out / "runs" / "tiny-shakespeare" / "checkpoints").name == "step_00000060"


def test_pipeline_preempt_has_a_training_run_checkpoint_and_waits_for_it(tmp_path):
    """What a Kubernetes preStop hook runs (cluster/kubernetes/*.yaml): `pipeline preempt <output_dir>` finds
    the run that is training there, has every rank checkpoint at the next step boundary, and returns once the
    checkpoint is written; the driver exits with code 75."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline.cli", "train", *TINY, "train.max_steps=300", "train.log_interval_steps=5",
            "train.eval_interval_steps=0", f"output_dir={out}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"step (\d+)/300", line):
            break
    assert (out / "runs" / "tiny-shakespeare" / "TRAINING").is_file(), "".join(lines)[-3000:]
    hook = subprocess.run([sys.executable, "-m", "pipeline.cli", "preempt", str(out), "--wait", "120"],
                          capture_output=True, text=True, timeout=180)
    assert hook.returncode == 0 and "run tiny-shakespeare: saved" in hook.stderr, hook.stderr[-3000:]
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, rest[-4000:]
    assert latest_complete(out / "runs" / "tiny-shakespeare" / "checkpoints") is not None
    assert not (out / "runs" / "tiny-shakespeare" / "TRAINING").exists()
    idle = subprocess.run([sys.executable, "-m", "pipeline.cli", "preempt", str(out), "--wait", "5"],
                          capture_output=True, text=True, timeout=60)
    assert idle.returncode == 0 and "asked run" not in idle.stderr  # nothing training: returns at once


def test_a_handler_installed_before_gets_the_signal_after_the_checkpoint(tmp_path):
    """Under hydra-submitit-launcher, submitit's USR1 handler requeues the sweep point as a new Slurm job: the
    driver first turns the signal into a PREEMPT file for the workers, then, with the checkpoint saved,
    passes the signal on to that handler; with no Python handler before it, nothing is called."""
    import os

    from pipeline.train.preemption import PREEMPT_FILE, PreemptionForwarder

    calls = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    before_term = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionForwarder(tmp_path) as forwarder:  # SIGTERM: ours alone (Ray's handler would exit 15)
            os.kill(os.getpid(), signal.SIGTERM)
            assert (tmp_path / PREEMPT_FILE).exists()
            forwarder.hand_over()
        assert calls == []
        with PreemptionForwarder(tmp_path) as forwarder:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert (tmp_path / PREEMPT_FILE).exists() and calls == []  # the workers are asked first
            forwarder.hand_over()
        assert calls == [signal.SIGUSR1]
        assert not (tmp_path / PREEMPT_FILE).exists()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        with PreemptionForwarder(tmp_path) as forwarder:
            os.kill(os.getpid(), signal.SIGUSR1)
            forwarder.hand_over()  # SIG_DFL is not called (it would kill the process)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)
        signal.signal(signal.SIGTERM, before_term)
