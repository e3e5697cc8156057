"""kill -9 in the middle of training, three ways, against one uninterrupted reference run of the same config:

- a training worker: Ray Train replaces the worker group, which resumes from the latest complete checkpoint;
- the driver (the `pipeline train` process itself): the Ray processes it started go with it (nothing of the
  run is left), and the same command again resumes;
- the whole run (driver and every process it started, as when its machine dies) while a checkpoint is being
  uploaded to a file:// object store: the half-uploaded tag is never taken as complete, the store's `latest`
  names the previous one, and the same command again resumes.

Each ends with the reference run's weights, bit for bit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_end_to_end import TINY

from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import latest_complete

pytestmark = pytest.mark.distributed

# Checkpoints of about 40 MB (with the optimizer states), so that an upload lasts long enough to be caught.
RUN = [*TINY, "model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.d_ff=1024", "train.max_steps=25",
       "train.save_interval_steps=5", "train.keep_last_checkpoints=3", "train.log_interval_steps=10",
       "train.eval_interval_steps=0", "train.max_failures=2", "train.lr=3e-3"]
LAST = "step_00000025"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[str], Path, dict]:
    """The command (less run_name), its output_dir (the data set prepared once for every test), and the final
    weights of the uninterrupted run."""
    root = tmp_path_factory.mktemp("kill")
    out = root / "out"
    args = [sys.executable, "-m", "pipeline.cli", "train", *RUN, f"output_dir={out}"]
    done = subprocess.run([*args, "run_name=reference"], capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return args, out, consolidated_state_dict(latest_complete(out / "runs" / "reference" / "checkpoints"))


def assert_same_weights(ckpts: Path, expected: dict) -> None:
    assert latest_complete(ckpts).name == LAST
    final = consolidated_state_dict(latest_complete(ckpts))
    for name in expected:
        assert torch.equal(final[name], expected[name]), name


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def train_workers_of(pid: int) -> list[psutil.Process]:
    """The Ray Train workers of the run whose driver is `pid` (its Ray starts inside the driver, so they descend
    from it), not those of another run on the machine (the suite runs two test processes at once)."""
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    found.append(proc)
    return found


def kill_session(sid: int) -> None:
    """SIGKILL to every process of the run at once, the training workers (which upload) first: Ray puts each
    worker in a process group of its own, so killpg of the driver's group would miss them."""
    for proc in sorted(session_processes(sid), key=lambda p: "RayTrainWorker" not in p.name()):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def step_of(tag: Path | None) -> int:
    return int(tag.name.split("_")[1]) if tag is not None else -1


def test_sigkill_of_a_worker_is_recovered_exactly(reference):
    args, out, expected = reference
    proc = subprocess.Popen([*args, "run_name=worker"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=out.parent)
    ckpts = out / "runs" / "worker" / "checkpoints"
    deadline, killed = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        if step_of(latest_complete(ckpts) if ckpts.exists() else None) >= 10:
            workers = train_workers_of(proc.pid)
            if workers:
                killed = workers[-1]
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=900)
    assert killed is not None, "the run ended before a worker could be killed:\n" + output[-3000:]
    assert proc.returncode == 0, output[-6000:]
    assert "resumed from" in output
    assert_same_weights(ckpts, expected)


def test_kill_9_of_the_training_driver_then_the_same_command_ends_with_the_uninterrupted_weights(reference):
    args, out, expected = reference
    ckpts = out / "runs" / "driver" / "checkpoints"
    proc = subprocess.Popen([*args, "run_name=driver"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=out.parent, start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            step = step_of(latest_complete(ckpts) if ckpts.exists() else None)
            if step >= 10:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
        assert killed_at is not None and killed_at < 25, "the run ended before its driver could be killed"
        # Ray's head processes share the driver's fate, the rest is stopped by pipeline.cluster.reaper.
        deadline = time.time() + 60
        while (left := session_processes(proc.pid)) and time.time() < deadline:
            time.sleep(1)
        assert not left, [" ".join(p.cmdline()[:3]) for p in left]
    finally:
        kill_session(proc.pid)
    again = subprocess.run([*args, "run_name=driver"], capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert again.returncode == 0, again.stderr[-6000:]
    assert "resumed from" in again.stdout + again.stderr
    assert_same_weights(ckpts, expected)


def kill_during_an_upload(args: list[str], out: Path, name: str):
    """Start a run that uploads its checkpoints to a file:// store and SIGKILL all of it once a checkpoint at
    step >= 10 is part-uploaded. The processes to kill are listed beforehand (refreshed while waiting), so the
    kill lands within a millisecond or so of the sighting. (run command, store, the tag caught, whether the kill
    landed before the upload's COMPLETE marker: with another test process loading the 2 cores, the upload can
    still win the race.)"""
    from pipeline.cluster.storage import ObjectStore

    bucket = out.parent / f"bucket-{name}"
    bucket.mkdir()
    stored = bucket / "runs" / name / "checkpoints"
    run = [*args, f"run_name={name}", f"cluster.storage_uri=file://{bucket}"]
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out.parent,
                            start_new_session=True)
    caught, targets, listed_at = None, [], 0.0
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and caught is None:
            if time.time() - listed_at > 0.25:
                with contextlib.suppress(psutil.Error):  # one that ended while listed: the next listing
                    targets = sorted(session_processes(proc.pid), key=lambda p: "RayTrainWorker" not in p.name())
                listed_at = time.time()
            for tag in sorted(stored.glob("step_*")) if stored.is_dir() else []:
                if step_of(tag) >= 10 and any(tag.iterdir()) and not (tag / "COMPLETE").exists():
                    for target in targets:
                        with contextlib.suppress(psutil.Error):
                            target.kill()
                    caught = tag.name
                    break
            time.sleep(0.002)
        kill_session(proc.pid)
        proc.wait(timeout=60)
        assert caught is not None, "no upload was caught in the middle before the run ended"
    finally:
        kill_session(proc.pid)
    store = ObjectStore(f"file://{bucket}")
    return run, store, caught, "COMPLETE" not in store.files(f"runs/{name}/checkpoints/{caught}")


def test_kill_9_during_a_checkpoint_upload_to_the_store_then_the_same_command_ends_with_the_same_weights(reference):
    args, out, expected = reference
    for attempt in range(3):  # a run whose upload outran the kill proves nothing: another run, another try
        name = f"uploaded{attempt}"
        run, store, caught, mid_upload = kill_during_an_upload(args, out, name)
        if mid_upload:
            break
    assert mid_upload, "the kill came after the upload, three times"
    latest = (store.read_text(f"runs/{name}/checkpoints/latest") or "").strip()
    assert latest < caught  # the half-uploaded tag is not `latest`

    again = subprocess.run(run, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert again.returncode == 0, again.stderr[-6000:]
    assert_same_weights(out / "runs" / name / "checkpoints", expected)
    assert (store.read_text(f"runs/{name}/checkpoints/latest") or "").strip() == LAST
