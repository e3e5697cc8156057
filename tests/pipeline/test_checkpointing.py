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

from pipeline.checkpointing import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_root,
    complete_tags,
    config_differences,
    consolidated_state_dict,
    latest_complete,
    verify_checkpoint,
)
from pipeline.config import ModelConfig, ParallelConfig, TrainConfig
from pipeline.ds_config import make_ds_config

MODEL = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64, dropout=0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    windows = (rng.integers(0, 64, size=(128, 1)) + rng.integers(1, 4, size=(128, 1)) * np.arange(17)) % 64
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), windows, vocab_size=64, val_windows=8)


def make_job(data_dir, run_dir, *, steps=6, save_every=0, zero=1, workers=2):
    from pipeline.train_loop import TrainJob

    train = TrainConfig(max_steps=steps, micro_batch_size=2, warmup_steps=1, lr=1e-2, save_interval_steps=save_every,
                        keep_last_checkpoints=10, global_batch_tokens=2 * workers * 16, log_interval_steps=1,
                        peak_tflops=1.0)
    parallel = ParallelConfig(num_workers=workers, zero_stage=zero, precision="fp32")
    return TrainJob(
        model=MODEL, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
        precision="fp32", grad_accum_steps=1, ds_config=make_ds_config(train, parallel, "fp32", 1),
        flops_per_token=1.0, config_fingerprint="f", math_config={"lr": 1e-2}, tokenizer_sha256="",
        record_losses=True,
    )


def train_and_report(job):
    from pipeline.train_loop import train_worker

    return train_worker(job)


@pytest.mark.distributed
def test_stop_and_resume_is_exact(data_dir, tmp_path):
    """2S steps in one go vs S steps, a stop, and a resume: identical losses and bitwise identical weights.
    Dropout is on, so the RNG state of every rank must come back too."""
    full = make_job(data_dir, tmp_path / "full", steps=6, save_every=3)
    full_losses = run_distributed(train_and_report, 2, full)[0].losses
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoint_root(tmp_path / "full") / "step_00000003", resumed_dir / "step_00000003")
    (resumed_dir / "latest").write_text("step_00000003")
    outcome = run_distributed(train_and_report, 2, dataclasses.replace(full, run_dir=str(tmp_path / "resumed")))[0]
    assert outcome.resumed_from.endswith("step_00000003")
    assert sorted(outcome.losses) == [3, 4, 5]
    assert [outcome.losses[s] for s in (3, 4, 5)] == [full_losses[s] for s in (3, 4, 5)]
    ours = consolidated_state_dict(latest_complete(resumed_dir))
    theirs = consolidated_state_dict(latest_complete(checkpoint_root(tmp_path / "full")))
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.distributed
def test_preemption_request_saves_and_stops_within_a_step(data_dir, tmp_path):
    from pipeline.train_loop import PREEMPT_FILE

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PREEMPT_FILE).touch()  # as the driver does on SIGTERM
    outcome = run_distributed(train_and_report, 2, make_job(data_dir, run_dir, steps=50))[0]
    assert outcome.preempted and outcome.final_step == 1
    assert latest_complete(checkpoint_root(run_dir)).name == "step_00000001"


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    if complete:
        # the layout a default run (2 workers, ZeRO-1, no TP) records
        marker = {
            "step": step,
            "world_size": 2,
            "zero_stage": 1,
            "tensor_parallel": 1,
            "files": {"mp_rank_00_model_states.pt": 100},
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


def test_truncated_checkpoint_file_is_named(tmp_path):
    tag = fake_checkpoint(tmp_path / "checkpoints", 5)
    verify_checkpoint(tag)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 60)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is truncated"):
        verify_checkpoint(tag)


def test_config_differences_list_every_changed_key():
    saved = {"model": {"n_layer": 4, "d_model": 128}, "train": {"lr": 1e-3}}
    now = {"model": {"n_layer": 6, "d_model": 128}, "train": {"lr": 1e-3, "beta2": 0.95}}
    assert config_differences(saved, now) == ["model.n_layer: 4 -> 6", "train.beta2: '<absent>' -> 0.95"]
    assert config_differences(saved, saved) == []


def test_resume_with_changed_math_is_refused_unless_allowed(tmp_path):
    from pipeline.config import PipelineConfig
    from pipeline.train import check_resume

    cfg = PipelineConfig(output_dir=str(tmp_path), run_name="r")
    job = make_job(tmp_path, tmp_path / "runs" / "r")
    tag = fake_checkpoint(tmp_path / "runs" / "r" / "checkpoints", 3)
    marker = json.loads((tag / COMPLETE_MARKER).read_text())
    marker["client_state"] = {"math_config": {"lr": 3e-3}}
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"lr: 0.003 -> 0.01"):
        check_resume(cfg, job)
    allowed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, allow_config_change=True))
    assert check_resume(allowed, job).resume_from is None  # auto: the worker picks the latest itself


def elastic_job(job, run_dir, workers, micro):
    """The driver's elastic path (pipeline.train.check_resume) for a test-made job."""
    from pipeline.checkpointing import needs_universal, read_marker, to_universal

    tag = latest_complete(checkpoint_root(Path(run_dir)))
    train = dataclasses.replace(job.train, micro_batch_size=micro)
    parallel = dataclasses.replace(job.parallel, num_workers=workers)
    resized = dataclasses.replace(job, train=train, parallel=parallel, run_dir=str(run_dir),
                                  ds_config=make_ds_config(train, parallel, "fp32", 1))
    assert needs_universal(read_marker(tag), workers, 1, job.parallel.zero_stage)
    return dataclasses.replace(resized, resume_from=str(to_universal(tag)),
                               ds_config={**resized.ds_config, "checkpoint": {"load_universal": True}})


@pytest.mark.distributed
@pytest.mark.parametrize("saved_workers,resumed_workers", [(2, 1), (1, 2)])
def test_elastic_resume_at_another_data_parallel_size(data_dir, tmp_path, saved_workers, resumed_workers):
    """Saved at one data-parallel size, resumed at another through DeepSpeed's universal checkpoint; the
    global batch (and so the data position) stays the same, and the losses continue."""
    job = dataclasses.replace(make_job(data_dir, tmp_path / "full", steps=6, save_every=3, workers=saved_workers))
    job = dataclasses.replace(job, model=dataclasses.replace(MODEL, dropout=0.0))
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, micro_batch_size=4 // saved_workers),
                              ds_config=make_ds_config(dataclasses.replace(job.train, micro_batch_size=4 // saved_workers),
                                                       job.parallel, "fp32", 1))
    full_losses = run_distributed(train_and_report, saved_workers, job)[0].losses
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoint_root(tmp_path / "full") / "step_00000003", resumed_dir / "step_00000003")
    (resumed_dir / "latest").write_text("step_00000003")
    resumed = elastic_job(job, tmp_path / "resumed", resumed_workers, 4 // resumed_workers)
    outcome = run_distributed(train_and_report, resumed_workers, resumed)[0]
    assert sorted(outcome.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert outcome.losses[step] == pytest.approx(full_losses[step], abs=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("saved_tp,resumed_tp", [(2, 1), (1, 2)])
def test_elastic_resume_at_another_tensor_parallel_degree(data_dir, tmp_path, saved_tp, resumed_tp):
    """DeepSpeed (0.19) converts AutoTP checkpoints to universal ones too (with the AutoTP metadata it stores
    in the checkpoint): saved at tp=2 and resumed at tp=1, or back, with data-parallel size 1 both times so
    that the global batch is unchanged, the losses continue."""
    from pipeline.checkpointing import needs_universal, read_marker, to_universal

    def at_tp(job, tp, run_dir):
        parallel = dataclasses.replace(job.parallel, num_workers=tp, tensor_parallel=tp, zero_stage=1)
        train = dataclasses.replace(job.train, micro_batch_size=4, global_batch_tokens=4 * 16)
        return dataclasses.replace(job, parallel=parallel, train=train, run_dir=str(run_dir),
                                   model=dataclasses.replace(MODEL, dropout=0.0),
                                   ds_config=make_ds_config(train, parallel, "fp32", 1))

    base = make_job(data_dir, tmp_path / "full", steps=6, save_every=3)
    full_losses = run_distributed(train_and_report, saved_tp, at_tp(base, saved_tp, tmp_path / "full"))[0].losses
    tag = checkpoint_root(tmp_path / "full") / "step_00000003"
    assert needs_universal(read_marker(tag), resumed_tp, resumed_tp, 1)
    resumed = at_tp(base, resumed_tp, tmp_path / "resumed")
    resumed = dataclasses.replace(resumed, resume_from=str(to_universal(tag)),
                                  ds_config={**resumed.ds_config, "checkpoint": {"load_universal": True}})
    outcome = run_distributed(train_and_report, resumed_tp, resumed)[0]
    assert sorted(outcome.losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert outcome.losses[step] == pytest.approx(full_losses[step], abs=1e-4)
