"""A worker killed with SIGKILL mid-run: Ray Train replaces the worker group, which resumes from the latest
complete checkpoint, and the run ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_end_to_end import TINY

from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import latest_complete

pytestmark = pytest.mark.distributed

RUN = [*TINY, "train.max_steps=40", "train.save_interval_steps=5", "train.keep_last_checkpoints=3",
       "train.log_interval_steps=5", "train.max_failures=2", "train.lr=3e-3"]


def train_workers(parent: psutil.Process) -> list[psutil.Process]:
    """Ray Train worker processes (they run under the raylet, not under the pipeline process)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline:
            found.append(proc)
    return found


def test_sigkill_of_a_worker_is_recovered_exactly(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline.cli", "train", *RUN, f"output_dir={out}"]
    reference = subprocess.run([*args, "run_name=reference"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-4000:]

    proc = subprocess.Popen([*args, "run_name=killed"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    ckpts = out / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 600
    killed = None
    while time.time() < deadline and proc.poll() is None:
        tag = latest_complete(ckpts) if ckpts.exists() else None
        if tag is not None and int(tag.name.split("_")[1]) >= 10:
            workers = train_workers(psutil.Process(proc.pid))
            if workers:
                killed = workers[-1]
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=900)
    assert killed is not None, "the run ended before a worker could be killed:\n" + output[-3000:]
    assert proc.returncode == 0, output[-6000:]
    assert "resumed from" in output

    final = consolidated_state_dict(latest_complete(ckpts))
    expected = consolidated_state_dict(latest_complete(out / "runs" / "reference" / "checkpoints"))
    assert latest_complete(ckpts).name == "step_00000040"
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
