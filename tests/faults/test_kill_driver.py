"""kill -9 of the driver (the `pipeline train` process itself, not a worker) in the middle of training: the
Ray processes it started go with it, and the same command again resumes from the newest complete checkpoint
and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import contextlib
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

RUN = [*TINY, "train.max_steps=300", "train.save_interval_steps=10", "train.keep_last_checkpoints=2",
       "train.log_interval_steps=50", "train.eval_interval_steps=0", "train.lr=3e-3"]


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def kill_session(sid: int) -> None:
    """SIGKILL to every process of the run at once, the training workers (which upload) first: Ray puts
    each worker in a process group of its own, so killpg of the driver's group would miss them."""
    procs = session_processes(sid)
    for proc in sorted(procs, key=lambda p: "RayTrainWorker" not in p.name()):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def test_kill_9_of_the_training_driver_then_the_same_command_ends_with_the_uninterrupted_weights(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline.cli", "train", *RUN, f"output_dir={out}"]
    reference = subprocess.run([*args, "run_name=reference"], capture_output=True, text=True, timeout=900,
                               cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-4000:]

    ckpts = out / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen([*args, "run_name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path, start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            tag = latest_complete(ckpts) if ckpts.exists() else None
            if tag is not None and int(tag.name.split("_")[1]) >= 20:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = int(tag.name.split("_")[1])
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
        assert killed_at is not None and killed_at < 300, "the run ended before its driver could be killed"
        # Ray's head processes share the driver's fate, its workers the raylet's: nothing of the run is left.
        deadline = time.time() + 60
        while (left := session_processes(proc.pid)) and time.time() < deadline:
            time.sleep(1)
        assert not left, [" ".join(p.cmdline()[:3]) for p in left]
    finally:
        for p in session_processes(proc.pid):
            p.kill()

    again = subprocess.run([*args, "run_name=killed"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-6000:]
    assert "resumed from" in again.stdout + again.stderr
    final = consolidated_state_dict(latest_complete(ckpts))
    expected = consolidated_state_dict(latest_complete(out / "runs" / "reference" / "checkpoints"))
    assert latest_complete(ckpts).name == "step_00000300"
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def test_kill_9_during_a_checkpoint_upload_to_the_store_then_the_same_command_ends_with_the_same_weights(tmp_path):
    """Everything of the run is killed (kill -9 of the driver and of every process it started, as when its
    machine dies) while a checkpoint is being uploaded to a file:// object store, its files partly in the store
    and its marker not yet: the store's `latest` still names the previous complete tag, the half-uploaded tag is
    never taken as complete, and the same command again ends with the uninterrupted run's weights. (Killing the
    driver alone lets the uploading worker finish first: Ray stops it only once the driver's death is seen.)"""
    from pipeline.cluster.storage import ObjectStore

    # Larger checkpoints (about 40 MB with the optimizer states) make the upload last long enough to be caught.
    big = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.d_ff=1024", "train.max_steps=40",
           "train.save_interval_steps=5", "train.keep_last_checkpoints=2", "train.log_interval_steps=10",
           "train.eval_interval_steps=0"]
    out, bucket = tmp_path / "out", tmp_path / "bucket"
    bucket.mkdir()
    args = [sys.executable, "-m", "pipeline.cli", "train", *TINY, *big, f"output_dir={out}"]
    reference = subprocess.run([*args, "run_name=reference"], capture_output=True, text=True, timeout=900,
                               cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-4000:]

    stored = bucket / "runs" / "uploaded" / "checkpoints"
    run = [*args, "run_name=uploaded", f"cluster.storage_uri=file://{bucket}"]
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                            start_new_session=True)
    caught = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and caught is None:
            for tag in sorted(stored.glob("step_*")) if stored.is_dir() else []:
                if int(tag.name.split("_")[1]) >= 10 and any(tag.iterdir()) and not (tag / "COMPLETE").exists():
                    kill_session(proc.pid)
                    caught = tag.name
                    break
            time.sleep(0.002)
        proc.wait(timeout=60)
        assert caught is not None, "no upload was caught in the middle before the run ended"
    finally:
        for p in session_processes(proc.pid):
            p.kill()
    store = ObjectStore(f"file://{bucket}")
    latest = (store.read_text("runs/uploaded/checkpoints/latest") or "").strip()
    assert "COMPLETE" not in store.files(f"runs/uploaded/checkpoints/{caught}"), "the kill came after the upload"
    assert latest < caught  # the half-uploaded tag is not `latest`

    again = subprocess.run(run, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-6000:]
    ckpts = out / "runs" / "uploaded" / "checkpoints"
    final = consolidated_state_dict(latest_complete(ckpts))
    expected = consolidated_state_dict(latest_complete(out / "runs" / "reference" / "checkpoints"))
    assert latest_complete(ckpts).name == "step_00000040"
    assert (store.read_text("runs/uploaded/checkpoints/latest") or "").strip() == "step_00000040"
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
