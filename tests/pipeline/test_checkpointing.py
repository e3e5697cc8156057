"""Checkpoints: complete-only `latest`, exact resume, preemption, damage detection, config checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_root,
    complete_tags,
    latest_complete,
    verify_checkpoint,
)
from pipeline.checkpoint.resume import config_differences
from pipeline.config import ModelConfig, ParallelConfig, TrainConfig
from pipeline.train.ds_config import make_ds_config

MODEL = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64, dropout=0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    windows = (rng.integers(0, 64, size=(128, 1)) + rng.integers(1, 4, size=(128, 1)) * np.arange(17)) % 64
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), windows, vocab_size=64, val_windows=8)


def make_spec(data_dir, run_dir, *, steps=6, save_every=0, zero=1, workers=2):
    from pipeline.train.run_spec import RunSpec

    train = TrainConfig(max_steps=steps, micro_batch_size=2, warmup_steps=1, lr=1e-2, save_interval_steps=save_every,
                        keep_last_checkpoints=10, global_batch_tokens=2 * workers * 16, log_interval_steps=1,
                        peak_tflops=1.0)
    parallel = ParallelConfig(num_workers=workers, zero_stage=zero, precision="fp32")
    return RunSpec(
        model=MODEL, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
        precision="fp32", grad_accum_steps=1, ds_config=make_ds_config(train, parallel, "fp32", 1),
        flops_per_token=1.0, config_fingerprint="f", math_config={"lr": 1e-2}, tokenizer_sha256="",
        record_losses=True,
    )


def as_the_driver_resumes(spec, output_dir: Path, run_name: str, **cfg):
    """The run's spec with train.resume decided as the driver decides it (pipeline.train.driver.decide_resume) for the
    run `run_name` under output_dir."""
    from pipeline.config import PipelineConfig
    from pipeline.train.driver import decide_resume

    config = PipelineConfig(output_dir=str(output_dir), run_name=run_name,
                            **({"train": spec.train, "parallel": spec.parallel} | cfg))
    resume_from, ds_config = decide_resume(config, spec.math_config, spec.ds_config)
    return dataclasses.replace(spec, resume_from=resume_from, ds_config=ds_config)


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


def crash_while_saving(spec, crash_step: int):
    """train_worker, but every rank dies (as in a node failure) in the middle of writing the checkpoint of
    crash_step: after DeepSpeed wrote its shards, before the COMPLETE marker."""
    import os

    from pipeline.checkpoint import save_load
    from pipeline.checkpoint.layout import tag_for
    from pipeline.train.worker import train_worker

    flush = save_load.fsync_files

    def dying(tag_dir):
        if tag_dir.name == tag_for(crash_step):
            os._exit(17)
        flush(tag_dir)

    save_load.fsync_files = dying
    return train_worker(spec)


def signal_after_step(spec, signum: int, step: int):
    """train_worker, with rank 1 sending itself `signum` (what Slurm sends) right after step `step`."""
    import os

    import torch.distributed as dist

    from pipeline.train.preemption import PreemptionFlag
    from pipeline.train.worker import train_worker

    check = PreemptionFlag.any_rank
    calls = {"n": 0}

    def any_rank(self, device):
        calls["n"] += 1
        if calls["n"] == step and dist.get_rank() == 1:
            os.kill(os.getpid(), signum)
        return check(self, device)

    PreemptionFlag.any_rank = any_rank
    return train_worker(spec)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """Six steps in one go, checkpoints at steps 3 and 6; dropout on, so resuming needs every rank's RNG."""
    spec = make_spec(data_dir, tmp_path_factory.mktemp("full"), steps=6, save_every=3)
    return spec, run_distributed(train_and_report, 2, spec)[0].losses


def final_weights(run_dir) -> dict:
    return consolidated_state_dict(latest_complete(checkpoint_root(Path(run_dir))))


@pytest.mark.distributed
def test_stop_and_resume_is_exact(full_run, tmp_path):
    """2S steps in one go vs S steps, a stop, and a resume: identical losses and bitwise identical weights.
    Dropout is on, so the RNG state of every rank must come back too."""
    full, full_losses = full_run
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoint_root(Path(full.run_dir)) / "step_00000003", resumed_dir / "step_00000003")
    (resumed_dir / "latest").write_text("step_00000003")
    resumed = dataclasses.replace(full, run_dir=str(tmp_path / "resumed"), resume_from=str(resumed_dir / "step_00000003"))
    outcome = run_distributed(train_and_report, 2, resumed)[0]
    assert outcome.resumed_from.endswith("step_00000003")
    assert sorted(outcome.losses) == [3, 4, 5]
    assert [outcome.losses[s] for s in (3, 4, 5)] == [full_losses[s] for s in (3, 4, 5)]
    ours, theirs = final_weights(tmp_path / "resumed"), final_weights(full.run_dir)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.distributed
def test_crash_while_writing_leaves_the_previous_checkpoint_latest_and_resumable(full_run, tmp_path):
    """A real run dies while writing its step-6 checkpoint: step 3 stays `latest`; the same command resumes from
    it and ends with the uninterrupted run's losses and weights; then a truncated file of a real checkpoint
    is named before any worker starts."""

    full, full_losses = full_run
    run_dir = tmp_path / "runs" / "r"
    spec = dataclasses.replace(full, run_dir=str(run_dir))
    with pytest.raises(RuntimeError, match="died without a result"):
        run_distributed(crash_while_saving, 2, spec, 6)
    root = checkpoint_root(run_dir)
    assert (root / "step_00000006").is_dir() and not (root / "step_00000006" / COMPLETE_MARKER).exists()
    assert (root / "latest").read_text() == "step_00000003"
    assert latest_complete(root).name == "step_00000003" and complete_tags(root) == ["step_00000003"]

    outcome = run_distributed(train_and_report, 2, as_the_driver_resumes(spec, tmp_path, "r"))[0]  # resume=auto
    assert outcome.resumed_from.endswith("step_00000003")
    assert [outcome.losses[s] for s in (3, 4, 5)] == [full_losses[s] for s in (3, 4, 5)]
    ours, theirs = final_weights(run_dir), final_weights(full.run_dir)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)

    shard = sorted((root / "step_00000006").glob("*optim_states.pt"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        as_the_driver_resumes(spec, tmp_path, "r")


def slow_async_writes(spec, slow_step: int, kill: bool):
    """train_worker with train.async_checkpoint, each file of the slow_step checkpoint taking 1 s more to write
    (in the rank's writer thread), and a record of whether that checkpoint was committed at each step's end.
    With `kill`, every rank's writer SIGKILLs its own process in the middle of that checkpoint instead (what a
    node failure does to it), while the training thread goes on."""
    import os
    import signal
    import time

    from pipeline.checkpoint import save_load
    from pipeline.checkpoint.layout import tag_for
    from pipeline.train.callbacks import PeriodicCheckpoint
    from pipeline.train.worker import train_worker

    write, after_step = save_load.save_hashed, PeriodicCheckpoint.after_step
    slow_tag = tag_for(slow_step)
    committed_at: dict[int, bool] = {}

    def slow_write(obj, path, **kwargs):
        if Path(path).parent.name == slow_tag:
            time.sleep(1.0)
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
        return write(obj, path, **kwargs)

    def recording(self, state, result):
        after_step(self, state, result)
        committed_at[result.done] = (self.checkpointer.ckpt_root / slow_tag / COMPLETE_MARKER).exists()

    save_load.save_hashed, PeriodicCheckpoint.after_step = slow_write, recording
    outcome = train_worker(dataclasses.replace(spec, train=dataclasses.replace(spec.train, async_checkpoint=True)))
    return outcome, committed_at


@pytest.mark.distributed
def test_an_asynchronous_checkpoint_is_written_while_training_goes_on_and_resumes_exactly(full_run, tmp_path):
    """train.async_checkpoint, checkpoints every 2 steps: the step-2 checkpoint's files take seconds to write, and
    step 3 trains meanwhile (no COMPLETE marker yet after it); it is committed later with the sha256 of every
    file. The step-4 one is copied into the buffers step 2's left; a resume from it ends with the uninterrupted
    run's losses and weights, bit for bit, as the asynchronous run itself does."""
    full, full_losses = full_run
    spec = dataclasses.replace(full, run_dir=str(tmp_path / "async"),
                               train=dataclasses.replace(full.train, save_interval_steps=2))
    outcome, committed_at = run_distributed(slow_async_writes, 2, spec, 2, False)[0]
    assert [outcome.losses[s] for s in range(6)] == [full_losses[s] for s in range(6)]
    assert committed_at[3] is False  # training went on while the files were written
    root = checkpoint_root(tmp_path / "async")
    assert complete_tags(root) == ["step_00000002", "step_00000004", "step_00000006"]
    for tag in ("step_00000002", "step_00000004"):
        verify_checkpoint(root / tag, content=True)
    ours, theirs = final_weights(tmp_path / "async"), final_weights(full.run_dir)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    resumed = dataclasses.replace(full, run_dir=str(tmp_path / "resumed"), resume_from=str(root / "step_00000004"))
    outcome = run_distributed(train_and_report, 2, resumed)[0]
    assert [outcome.losses[s] for s in (4, 5)] == [full_losses[s] for s in (4, 5)]
    ours = final_weights(tmp_path / "resumed")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.distributed
def test_kill_9_during_an_asynchronous_write_leaves_the_previous_checkpoint_in_use(full_run, tmp_path):
    """Checkpoints every 2 steps, asynchronous: every rank is SIGKILLed while its step-4 files are being
    written (training at step 5 meanwhile). Step 2 stays `latest`; the step-4 tag has no marker; the same
    command resumes from step 2 and trains the uninterrupted run's losses and weights."""
    full, full_losses = full_run
    run_dir = tmp_path / "runs" / "r"
    spec = dataclasses.replace(full, run_dir=str(run_dir),
                               train=dataclasses.replace(full.train, save_interval_steps=2))
    with pytest.raises(RuntimeError, match="died without a result"):
        run_distributed(slow_async_writes, 2, spec, 4, True)
    root = checkpoint_root(run_dir)
    assert (root / "latest").read_text() == "step_00000002" and complete_tags(root) == ["step_00000002"]
    assert (root / "step_00000004").is_dir() and not (root / "step_00000004" / COMPLETE_MARKER).exists()
    outcome = run_distributed(train_and_report, 2, as_the_driver_resumes(spec, tmp_path, "r"))[0]  # resume=auto
    assert outcome.resumed_from.endswith("step_00000002")
    assert [outcome.losses[s] for s in (2, 3, 4, 5)] == [full_losses[s] for s in (2, 3, 4, 5)]
    ours, theirs = final_weights(run_dir), final_weights(full.run_dir)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.distributed
def test_every_file_carries_its_sha256_from_the_write_and_a_changed_byte_stops_the_resume(full_run, tmp_path):
    """The marker records the sha256 each rank computed while writing its files (DeepSpeed's shards and the RNG
    files); `checkpoint inspect --verify` checks them, and a resume from a copy with one byte changed (same
    size, so the size check passes) stops on every rank, naming the file, before any step runs."""
    import subprocess
    import sys

    from pipeline.checkpoint.layout import read_marker
    from pipeline.files import sha256_file

    full, _ = full_run
    tag = checkpoint_root(Path(full.run_dir)) / "step_00000006"
    marker = read_marker(tag)
    assert set(marker["sha256"]) == set(marker["files"]) and len(marker["sha256"]) >= 4
    assert all(sha256_file(tag / name) == digest for name, digest in marker["sha256"].items())

    def inspect(path, *flags):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "checkpoint", "inspect", str(path), *flags],
                              capture_output=True, text=True, timeout=120)

    good = inspect(tag, "--verify")
    assert good.returncode == 0 and "sizes and sha256 verified" in good.stdout, good.stderr
    run_dir = tmp_path / "damaged"
    copy = checkpoint_root(run_dir) / tag.name
    shutil.copytree(tag, copy)
    (checkpoint_root(run_dir) / "latest").write_text(tag.name)
    shard = sorted(copy.glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert inspect(copy).returncode == 0  # the sizes alone cannot tell
    bad = inspect(copy, "--verify")
    assert bad.returncode == 1 and f"{shard.name} fails its sha256" in bad.stderr, bad.stderr
    with pytest.raises(RuntimeError, match=f"{shard.name} fails its sha256"):
        run_distributed(train_and_report, 2, dataclasses.replace(full, run_dir=str(run_dir),
                                                                  resume_from=str(copy)))
    assert complete_tags(checkpoint_root(run_dir)) == [tag.name]  # nothing trained, nothing written


@pytest.mark.distributed
def test_a_signal_saves_at_the_next_step_boundary(data_dir, tmp_path):
    """SIGUSR1 (Slurm's warning before the time limit) reaching one rank after step 4: every rank saves the
    step-4 checkpoint and stops there, not a step later."""
    import signal

    run_dir = tmp_path / "run"
    outcome = run_distributed(signal_after_step, 2, make_spec(data_dir, run_dir, steps=50), signal.SIGUSR1, 4)[0]
    assert outcome.preempted and outcome.final_step == 4
    assert latest_complete(checkpoint_root(run_dir)).name == "step_00000004"


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(4)}}, tag / "mp_rank_00_model_states.pt")
    if complete:
        # the layout a default run (2 workers, ZeRO-1, no TP) records
        marker = {
            "step": step,
            "world_size": 2,
            "zero_stage": 1,
            "tensor_parallel": 1,
            "files": {"mp_rank_00_model_states.pt": (tag / "mp_rank_00_model_states.pt").stat().st_size},
        }
        (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    return tag


def test_interrupted_write_leaves_the_previous_checkpoint_latest(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    (root / "latest").write_text("step_00000010")
    fake_checkpoint(root, 20, complete=False)  # the crash came before the marker
    assert latest_complete(root).name == "step_00000010"
    assert complete_tags(root) == ["step_00000010"]
    (root / "latest").write_text("step_00000020")  # even if `latest` had moved, an incomplete tag is skipped
    assert latest_complete(root).name == "step_00000010"


def test_a_restarted_worker_group_continues_from_its_own_newest_checkpoint(tmp_path):
    """After an elastic (universal) or explicit resume, a worker group that Ray restarts after a failure must
    not go back to the checkpoint the launch began from: the launch's own newer checkpoints come first."""
    from pipeline.train.worker import resume_point

    run_dir = tmp_path / "run"
    root = checkpoint_root(run_dir)

    def stamp(tag, launch_id):
        marker = json.loads((tag / COMPLETE_MARKER).read_text())
        marker["client_state"] = {"launch_id": launch_id}
        (tag / COMPLETE_MARKER).write_text(json.dumps(marker))

    universal = fake_checkpoint(root / "universal", 10)
    stamp(fake_checkpoint(root, 10), "earlier launch")
    (root / "latest").write_text("step_00000010")
    spec = dataclasses.replace(make_spec(tmp_path, run_dir), launch_id="this launch", resume_from=str(universal),
                              ds_config={"train_batch_size": 4, "checkpoint": {"load_universal": True}})
    assert resume_point(spec, root) == (universal, spec.ds_config)  # the first start
    stamp(fake_checkpoint(root, 20), "this launch")
    (root / "latest").write_text("step_00000020")
    assert resume_point(spec, root) == (root / "step_00000020", {"train_batch_size": 4})  # after a restart
    fresh = dataclasses.replace(spec, resume_from=None, train=dataclasses.replace(spec.train, resume="none"))
    assert resume_point(fresh, root)[0] == root / "step_00000020"  # resume=none restarts keep their progress too
    other = dataclasses.replace(fresh, launch_id="another launch")
    assert resume_point(other, root)[0] is None


def test_pruning_keeps_the_last_k_and_clears_crash_leftovers(tmp_path):
    from pipeline.checkpoint.layout import UNIVERSAL_DIR, prune_old

    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 25, complete=False)  # a crash while writing step 25
    fake_checkpoint(root, 50, complete=False)  # being written now
    fake_checkpoint(root / UNIVERSAL_DIR, 10)
    prune_old(root, keep_last=2)
    assert complete_tags(root) == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_00000030", "step_00000040", "step_00000050"]
    assert not (root / UNIVERSAL_DIR / "step_00000010").exists()
    prune_old(root, keep_last=0)  # 0 keeps every complete checkpoint
    assert complete_tags(root) == ["step_00000030", "step_00000040"]


def test_truncated_checkpoint_file_is_named(tmp_path):
    tag = fake_checkpoint(tmp_path / "checkpoints", 5)
    verify_checkpoint(tag)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 60)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is truncated"):
        verify_checkpoint(tag)


def test_a_checkpoint_that_pickles_code_is_refused_before_anything_loads_it(tmp_path, monkeypatch):
    import os

    from pipeline.checkpoint.pickles import TRUSTED_GLOBALS_ENV, check_pickles

    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "ds_version": "0.19"}, tag / "mp_rank_00_model_states.pt")
    check_pickles(tag)  # tensors and plain data pass
    torch.save({"optimizer": {}, "hook": os.system}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"optim_states.pt pickles .*posix.system.*could run arbitrary code") as err:
        check_pickles(tag)
    assert TRUSTED_GLOBALS_ENV not in str(err.value)  # never suggests trusting what it refuses
    monkeypatch.setenv(TRUSTED_GLOBALS_ENV, "posix.system")  # a function of the operating system: never trusted
    with pytest.raises(CheckpointError, match=r"names 'posix.system', which can run code"):
        check_pickles(tag)
    import fractions

    monkeypatch.delenv(TRUSTED_GLOBALS_ENV)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    torch.save({"ratio": fractions.Fraction(1, 3)}, tag / "extra.pt")
    with pytest.raises(CheckpointError, match=r"fractions.Fraction"):
        check_pickles(tag)
    monkeypatch.setenv(TRUSTED_GLOBALS_ENV, "fractions.Fraction")  # a class the user chose to trust
    check_pickles(tag)


def test_config_differences_list_every_changed_key():
    saved = {"model": {"n_layer": 4, "d_model": 128}, "train": {"lr": 1e-3}}
    now = {"model": {"n_layer": 6, "d_model": 128}, "train": {"lr": 1e-3, "beta2": 0.95}}
    assert config_differences(saved, now) == ["model.n_layer: 4 -> 6", "train.beta2: '<absent>' -> 0.95"]
    assert config_differences(saved, saved) == []


def test_resume_with_changed_math_is_refused_unless_allowed(tmp_path):
    spec = make_spec(tmp_path, tmp_path / "runs" / "r")
    tag = fake_checkpoint(tmp_path / "runs" / "r" / "checkpoints", 3)
    marker = json.loads((tag / COMPLETE_MARKER).read_text())
    marker["client_state"] = {"math_config": {"lr": 3e-3}}
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"lr: 0.003 -> 0.01"):
        as_the_driver_resumes(spec, tmp_path, "r")
    allowed = dataclasses.replace(spec.train, allow_config_change=True)
    assert as_the_driver_resumes(spec, tmp_path, "r", train=allowed).resume_from == str(tag)  # auto: the latest


def test_math_config_holds_what_changes_the_numbers(tmp_path):
    """The schedule's length, the precision and the tokenizer are part of the math; logging is not."""
    from pipeline.config import PipelineConfig
    from pipeline.train.driver import math_config

    cfg = PipelineConfig()
    base = math_config(cfg, MODEL, tmp_path, "bf16", "abc")

    def changed(**train):
        other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
        return config_differences(base, math_config(other, MODEL, tmp_path, "bf16", "abc"))

    assert changed(max_steps=cfg.train.max_steps * 2) == [
        f"train.max_steps: {cfg.train.max_steps} -> {cfg.train.max_steps * 2}"]
    assert changed(log_interval_steps=1, save_interval_steps=7, keep_last_checkpoints=1) == []
    constant = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule="constant"))
    longer = dataclasses.replace(constant, train=dataclasses.replace(constant.train, max_steps=10_000))
    assert config_differences(math_config(constant, MODEL, tmp_path, "bf16", "abc"),
                              math_config(longer, MODEL, tmp_path, "bf16", "abc")) == []
    assert config_differences(base, math_config(cfg, MODEL, tmp_path, "fp32", "def")) == [
        "precision: 'bf16' -> 'fp32'", "tokenizer_sha256: 'abc' -> 'def'"]


def test_a_zero_stage_change_deepspeed_cannot_load_is_refused_before_workers_start(tmp_path):
    from pipeline.config import ConfigError

    spec = make_spec(tmp_path, tmp_path / "runs" / "r")
    fake_checkpoint(tmp_path / "runs" / "r" / "checkpoints", 3)  # saved at ZeRO-1 on 2 workers
    for stage in (0, 3):
        with pytest.raises(ConfigError, match=rf"ZeRO stage 1, .* parallel.zero_stage={stage} .*zero_stage=1 "):
            as_the_driver_resumes(spec, tmp_path, "r", parallel=dataclasses.replace(spec.parallel, zero_stage=stage))


def test_an_elastic_resume_of_a_muon_run_is_refused_before_the_conversion(tmp_path):
    """DeepSpeed's universal conversion fails on Muon's state (measured: KeyError 'exp_avg' at ZeRO 1 and 3):
    refused on the driver with the way out, before any conversion."""
    from pipeline.config import ConfigError

    spec = make_spec(tmp_path, tmp_path / "runs" / "r")
    fake_checkpoint(tmp_path / "runs" / "r" / "checkpoints", 3)  # saved at ZeRO-1 on 2 workers
    muon = dataclasses.replace(spec.train, optimizer="muon")
    with pytest.raises(ConfigError, match=r"world size 2, .*Muon's momentum buffers .*resume with the saved layout"):
        as_the_driver_resumes(spec, tmp_path, "r", train=muon, parallel=dataclasses.replace(spec.parallel,
                                                                                            num_workers=1))
    assert not (tmp_path / "runs" / "r" / "checkpoints" / "universal").exists()
    as_the_driver_resumes(spec, tmp_path, "r", train=muon)  # the saved layout resumes


def elastic_spec(spec, output_dir: Path, run_name: str, workers: int, micro: int, tp: int = 1, zero: int | None = None):
    """The run's spec resized to `workers` ranks (tensor-parallel degree tp, ZeRO stage zero), resumed the way the
    driver does it: pipeline.train.driver.decide_resume finds the run's latest checkpoint, sees the other layout
    and converts it."""
    train = dataclasses.replace(spec.train, micro_batch_size=micro)
    parallel = dataclasses.replace(spec.parallel, num_workers=workers, tensor_parallel=tp,
                                   zero_stage=spec.parallel.zero_stage if zero is None else zero)
    resized = dataclasses.replace(spec, train=train, parallel=parallel, run_dir=str(output_dir / "runs" / run_name),
                                  ds_config=make_ds_config(train, parallel, "fp32", 1))
    resumed = as_the_driver_resumes(resized, output_dir, run_name)
    assert resumed.ds_config["checkpoint"] == {"load_universal": True}
    assert Path(resumed.resume_from).parent.name == "universal"
    return resumed


@pytest.mark.distributed
@pytest.mark.parametrize("saved_workers,resumed_workers,resumed_zero", [(2, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_elastic_resume_at_another_data_parallel_size(data_dir, tmp_path, saved_workers, resumed_workers,
                                                      resumed_zero):
    """Saved at one data-parallel size (ZeRO-1), resumed at another (and at ZeRO-2) through DeepSpeed's
    universal checkpoint; the global batch (and so the data position) stays the same, and the losses
    continue."""
    spec = dataclasses.replace(make_spec(data_dir, tmp_path / "full", steps=6, save_every=3, workers=saved_workers))
    spec = dataclasses.replace(spec, model=dataclasses.replace(MODEL, dropout=0.0))
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, micro_batch_size=4 // saved_workers),
                              ds_config=make_ds_config(dataclasses.replace(spec.train, micro_batch_size=4 // saved_workers),
                                                       spec.parallel, "fp32", 1))
    full_losses = run_distributed(train_and_report, saved_workers, spec)[0].losses
    resumed_dir = tmp_path / "runs" / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoint_root(tmp_path / "full") / "step_00000003", resumed_dir / "step_00000003")
    (resumed_dir / "latest").write_text("step_00000003")
    resumed = elastic_spec(spec, tmp_path, "resumed", resumed_workers, 4 // resumed_workers, zero=resumed_zero)
    outcome = run_distributed(train_and_report, resumed_workers, resumed)[0]
    assert sorted(outcome.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert outcome.losses[step] == pytest.approx(full_losses[step], abs=1e-4)


def at_layout(spec, run_dir, workers: int, *, tp: int = 1, sp: int = 1, zero: int, model=None):
    """The run's spec on `workers` ranks at (tp, sp, ZeRO stage), dropout off, the global batch 4 windows."""
    parallel = dataclasses.replace(spec.parallel, num_workers=workers, tensor_parallel=tp, sequence_parallel=sp,
                                   zero_stage=zero)
    train = dataclasses.replace(spec.train, micro_batch_size=4 * tp * sp // workers, global_batch_tokens=4 * 16)
    return dataclasses.replace(spec, parallel=parallel, train=train, run_dir=str(run_dir),
                               model=model or dataclasses.replace(MODEL, dropout=0.0),
                               ds_config=make_ds_config(train, parallel, "fp32", 1))


@pytest.mark.distributed
@pytest.mark.parametrize("saved,resumed", [((2, 2), (1, 1)), ((1, 2), (2, 2)), ((1, 2), (1, 1))],
                         ids=["out-of-tp2xdp2", "into-tp2xdp2", "dp2-to-dp1"])
def test_elastic_resume_at_zero_3_into_and_out_of_tensor_parallelism(data_dir, tmp_path, saved, resumed):
    """ZeRO-3 checkpoints through DeepSpeed's universal conversion, (tp, dp) -> (tp, dp) with the global batch the
    same: tp 2 x dp 2 on 4 ranks resumed on one rank, tp 1 x dp 2 resumed at tp 2 x dp 2, and dp 2 -> 1 without
    tensor parallelism. The losses continue as the uninterrupted run's. Each case failed on one of the DeepSpeed
    0.19.8 defects the pipeline repairs: the AutoTP metadata of whole weights (repair_autotp_metadata, at save),
    the bare tensors of a conversion without TP (wrap_plain_states), the parameter groups' settings and the shared
    step count after the load (repair_zero3_universal_load)."""

    tp, dp = saved
    first = at_layout(make_spec(data_dir, tmp_path / "full", steps=6, save_every=3), tmp_path / "full", tp * dp,
                      tp=tp, zero=3)
    full_losses = run_distributed(train_and_report, first.parallel.num_workers, first)[0].losses
    tag = checkpoint_root(tmp_path / "full") / "step_00000003"
    explicit = dataclasses.replace(first, train=dataclasses.replace(first.train, resume=str(tag)))
    tp, dp = resumed
    then = elastic_spec(explicit, tmp_path, "resumed", tp * dp, 4 // dp, tp=tp)
    outcome = run_distributed(train_and_report, tp * dp, then)[0]
    assert sorted(outcome.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert outcome.losses[step] == pytest.approx(full_losses[step], abs=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("saved,resumed,zero", [((2, 2), (2, 1), 1), ((1, 1), (2, 2), 3), ((4, 2), (2, 2), 3)],
                         ids=["sp2-to-dp2-zero1", "one-rank-to-sp2-zero3", "sp2xdp2-to-sp2-zero3"])
def test_resume_at_another_sequence_parallel_size(data_dir, tmp_path, saved, resumed, zero):
    """(workers, sequence_parallel) -> (workers, sequence_parallel), the global batch the same, document masking on:
    sp 2 on 2 ranks resumed as dp 2 on the same 2 ranks (ZeRO partitions over all ranks either way: a plain load,
    the data-parallel size and the data position follow), one rank resumed at sp 2 and sp 2 x dp 2 resumed at
    sp 2 on 2 ranks under ZeRO-3 (DeepSpeed's universal conversion). The losses continue as the uninterrupted
    run's."""

    documents = dataclasses.replace(MODEL, dropout=0.0, document_mask=True, eos_id=0)
    first = at_layout(make_spec(data_dir, tmp_path / "full", steps=6, save_every=3), tmp_path / "full", saved[0],
                      sp=saved[1], zero=zero, model=documents)
    full_losses = run_distributed(train_and_report, first.parallel.num_workers, first)[0].losses
    tag = checkpoint_root(tmp_path / "full") / "step_00000003"
    explicit = dataclasses.replace(first, train=dataclasses.replace(first.train, resume=str(tag)))
    workers, sp = resumed
    then = as_the_driver_resumes(at_layout(explicit, tmp_path / "runs" / "resumed", workers, sp=sp, zero=zero,
                                           model=documents), tmp_path, "resumed")
    assert ("checkpoint" in then.ds_config) == (saved[0] != workers)  # universal only for another world size
    outcome = run_distributed(train_and_report, workers, then)[0]
    assert sorted(outcome.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert outcome.losses[step] == pytest.approx(full_losses[step], abs=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("saved_tp,resumed_tp", [(2, 1), (1, 2)])
def test_elastic_resume_at_another_tensor_parallel_degree(data_dir, tmp_path, saved_tp, resumed_tp):
    """DeepSpeed (0.19) converts AutoTP checkpoints to universal ones too (with the AutoTP metadata it stores
    in the checkpoint): saved at tp=2 and resumed at tp=1, or back, with data-parallel size 1 both times so
    that the global batch is unchanged, the losses continue. The resume names the checkpoint explicitly."""

    def at_tp(spec, tp, run_dir):
        parallel = dataclasses.replace(spec.parallel, num_workers=tp, tensor_parallel=tp, zero_stage=1)
        train = dataclasses.replace(spec.train, micro_batch_size=4, global_batch_tokens=4 * 16)
        return dataclasses.replace(spec, parallel=parallel, train=train, run_dir=str(run_dir),
                                   model=dataclasses.replace(MODEL, dropout=0.0),
                                   ds_config=make_ds_config(train, parallel, "fp32", 1))

    saved = at_tp(make_spec(data_dir, tmp_path / "full", steps=6, save_every=3), saved_tp, tmp_path / "full")
    full_losses = run_distributed(train_and_report, saved_tp, saved)[0].losses
    tag = checkpoint_root(tmp_path / "full") / "step_00000003"
    explicit = dataclasses.replace(saved, train=dataclasses.replace(saved.train, resume=str(tag)))
    resumed = elastic_spec(explicit, tmp_path, "resumed", resumed_tp, 4, tp=resumed_tp)
    outcome = run_distributed(train_and_report, resumed_tp, resumed)[0]
    assert sorted(outcome.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert outcome.losses[step] == pytest.approx(full_losses[step], abs=1e-4)
