"""Checkpoints are untrusted input: a crafted checkpoint runs no code and names nothing outside itself.

Every hostile checkpoint here starts from a real one (two gloo ranks, ZeRO-1, a few steps) and carries a real
payload: a pickle that would create a file when unpickled. The tests check the refusal, its message, and that the
file was never created.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.checkpoint.layout import COMPLETE_MARKER, UNIVERSAL_DIR, CheckpointError, checkpoint_root
from pipeline.checkpoint.pickles import TRUSTED_GLOBALS_ENV, check_pickles, safe_load, weights_only_loading
from pipeline.config import ModelConfig, ParallelConfig, TrainConfig
from pipeline.train.ds_config import make_ds_config

MODEL = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64)


class Payload:
    """Unpickling it runs `touch <path>`: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_payload(path, proof) -> None:
    torch.save({"module": {"w": torch.zeros(2)}, "hook": Payload(proof)}, path)


def make_spec(data_dir, run_dir, *, workers=2, steps=3, resume_from=None, universal=False):
    from pipeline.train.run_spec import RunSpec

    train = TrainConfig(max_steps=steps, micro_batch_size=2, warmup_steps=1, lr=1e-2, keep_last_checkpoints=10,
                        global_batch_tokens=2 * 2 * 16, log_interval_steps=1, peak_tflops=1.0,
                        resume="auto" if resume_from is None else str(resume_from))
    parallel = ParallelConfig(num_workers=workers, zero_stage=1, precision="fp32")
    accum = 2 // workers
    ds_config = make_ds_config(train, parallel, "fp32", accum)
    if universal:
        ds_config = {**ds_config, "checkpoint": {"load_universal": True}}
    return RunSpec(
        model=MODEL, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir), precision="fp32",
        grad_accum_steps=accum, ds_config=ds_config, flops_per_token=1.0, config_fingerprint="f",
        math_config={"lr": 1e-2}, tokenizer_sha256="", record_losses=True,
        resume_from=None if resume_from is None else str(resume_from),
    )


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data set, run directory) of a real run: two ranks, ZeRO-1, saved at step 3."""
    from data_prep.shards import write_synthetic_dataset

    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    windows = (rng.integers(0, 64, size=(64, 1)) + np.arange(17)) % 64
    data_dir = write_synthetic_dataset(root / "data", windows, vocab_size=64, val_windows=4)
    run_dir = root / "runs" / "r"
    run_distributed(train_and_report, 2, make_spec(data_dir, run_dir))
    assert (checkpoint_root(run_dir) / "step_00000003" / COMPLETE_MARKER).is_file()
    return data_dir, run_dir


def copy_run(trained, tmp_path):
    data_dir, run_dir = trained
    copy = tmp_path / "runs" / "r"
    shutil.copytree(run_dir, copy)
    return data_dir, copy, checkpoint_root(copy) / "step_00000003"


def test_a_linked_folder_inside_a_checkpoint_is_refused_on_the_driver_and_on_every_rank(trained, tmp_path):
    """The hole: Python's rglob does not enter a linked folder, so a payload in one escaped the scan and
    DeepSpeed unpickled it. Now a link anywhere in a checkpoint is refused before anything reads it."""
    from pipeline.checkpoint.resume import resume_source

    data_dir, run_dir, tag = copy_run(trained, tmp_path)
    outside, proof = tmp_path / "outside", tmp_path / "code-ran"
    outside.mkdir()
    write_payload(outside / "zero_pp_rank_0_mp_rank_00_optim_states.pt", proof)
    (tag / "extra").symlink_to(outside, target_is_directory=True)

    spec = make_spec(data_dir, run_dir, steps=4, resume_from=tag)
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_00000003 holds 'extra', which is a symbolic link"):
        resume_source(spec.train, spec.parallel, run_dir, spec.math_config)
    with pytest.raises(RuntimeError, match=r"holds 'extra', which is a symbolic link"):
        run_distributed(train_and_report, 2, spec)  # the workers refuse it too, whatever the driver did
    assert not proof.exists()


def test_a_payload_in_a_checkpoint_file_is_refused_by_the_scan_and_by_the_loader(trained, tmp_path):
    """Both walls, each alone: the scan refuses the file before loading; the loader (weights-only, even where
    DeepSpeed asks for weights_only=False) refuses it if the scan were skipped."""
    data_dir, run_dir, tag = copy_run(trained, tmp_path)
    proof = tmp_path / "code-ran"
    target = tag / "mp_rank_00_model_states.pt"
    write_payload(target, proof)

    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt pickles .*posix.system.*could run arbitrary"):
        check_pickles(tag)
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        safe_load(target)
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(target, weights_only=False)  # what DeepSpeed's own loads ask for
    from pipeline.checkpoint.save_load import PipelineCheckpointEngine

    with pytest.raises(pickle.UnpicklingError):
        PipelineCheckpointEngine(True).load(str(target))
    # The marker's sha256 no longer matches: fix it up as an attacker would, so only the walls stand.
    marker = json.loads((tag / COMPLETE_MARKER).read_text())
    from pipeline.files import sha256_file

    marker["sha256"][target.name] = sha256_file(target)
    marker["files"][target.name] = target.stat().st_size
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(RuntimeError, match=r"pickles .*posix.system"):
        run_distributed(train_and_report, 2, make_spec(data_dir, run_dir, steps=4, resume_from=tag))
    assert not proof.exists()


def test_a_crafted_universal_conversion_is_rebuilt_and_a_consistent_forgery_still_runs_nothing(trained, tmp_path):
    """A universal conversion found in place is reused only when it was made from this checkpoint's files and
    is unchanged since; a planted one is rebuilt. A forgery that copies the real conversion and fixes its marker
    up after adding a payload passes that check, and then meets the scan on every rank."""
    from pipeline.checkpoint.universal import to_universal
    from pipeline.files import sha256_file

    data_dir, run_dir, tag = copy_run(trained, tmp_path)
    proof = tmp_path / "code-ran"
    planted = checkpoint_root(run_dir) / UNIVERSAL_DIR / tag.name
    planted.mkdir(parents=True)
    write_payload(planted / "mp_rank_00_model_states.pt", proof)
    (planted / COMPLETE_MARKER).write_text((tag / COMPLETE_MARKER).read_text())  # "complete": reused before
    out = to_universal(tag)
    assert out == planted and not proof.exists()
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["universal_source_sha256"] == sha256_file(tag / COMPLETE_MARKER)
    assert any(name.startswith("zero/") for name in marker["sha256"])  # every file, recursively
    check_pickles(out)  # the rebuilt conversion holds DeepSpeed's files only

    # A consistent forgery: a payload inside the real conversion's tree, its marker fixed up.
    victim = next(name for name in sorted(marker["sha256"]) if name.startswith("zero/") and name.endswith(".pt"))
    write_payload(out / victim, proof)
    marker["sha256"][victim], marker["files"][victim] = sha256_file(out / victim), (out / victim).stat().st_size
    (out / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert to_universal(tag) == out  # reused: self-consistent ...
    spec = make_spec(data_dir, run_dir, workers=1, steps=4, resume_from=out, universal=True)
    with pytest.raises(RuntimeError, match=r"pickles .*posix.system"):
        run_distributed(train_and_report, 1, spec)  # ... and refused by the scan on the rank that would load it
    assert not proof.exists()


def test_the_universal_conversion_resumes_with_weights_only_loads(trained, tmp_path):
    """The honest path through the walls: a ZeRO-1 checkpoint of 2 ranks resumes at 1 rank through DeepSpeed's
    universal conversion (converted in a weights-only subprocess, loaded weights-only) and trains on."""
    from pipeline.checkpoint.universal import to_universal

    data_dir, run_dir, tag = copy_run(trained, tmp_path)
    out = to_universal(tag)
    [result] = run_distributed(train_and_report, 1, make_spec(data_dir, run_dir, workers=1, steps=4, resume_from=out,
                                                           universal=True))
    assert result.final_step == 4 and np.isfinite(list(result.losses.values())).all()


def test_trusting_a_global_that_can_run_code_is_refused(tmp_path, monkeypatch):
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    write_payload(tag / "mp_rank_00_model_states.pt", tmp_path / "code-ran")
    with pytest.raises(CheckpointError) as refused:
        check_pickles(tag)
    assert TRUSTED_GLOBALS_ENV not in str(refused.value)  # the refusal never suggests trusting it
    for name, why in [("posix.system", "can run code"), ("builtins.exec", "can run code"),
                      ("subprocess.Popen", "can run code"), ("json.loads", "not a class"),
                      ("nosuch.Module", "cannot be imported")]:
        monkeypatch.setenv(TRUSTED_GLOBALS_ENV, name)
        with pytest.raises(CheckpointError, match=why):
            check_pickles(tag)
    assert not (tmp_path / "code-ran").exists()


def test_a_parameter_name_that_is_a_path_never_reaches_the_universal_converter(trained, tmp_path):
    """DeepSpeed's converter writes each parameter's states under <output>/zero/<name>/: a checkpoint that names a
    parameter '../../../escaped' (plain strings: the scan and the weights-only loader pass them) would make it
    write outside its output. Refused before the conversion, naming the file and the parameter."""
    from pipeline.checkpoint.universal import to_universal
    from pipeline.files import sha256_file

    _, run_dir, tag = copy_run(trained, tmp_path)
    path = tag / "mp_rank_00_model_states.pt"
    state = safe_load(path)
    escape = "../../../../escaped"
    first = next(iter(state["module"]))
    state["module"] = {(escape if k == first else k): v for k, v in state["module"].items()}
    state["param_shapes"] = [{(escape if k == first else k): v for k, v in group.items()}
                             for group in state["param_shapes"]]
    torch.save(state, path)
    marker = json.loads((tag / COMPLETE_MARKER).read_text())
    marker["sha256"][path.name], marker["files"][path.name] = sha256_file(path), path.stat().st_size
    (tag / COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt names the parameter '\.\./\.\./\.\./\.\./"
                                              r"escaped', which is not a module path"):
        to_universal(tag)
    assert not any(p.name == "escaped" for p in tmp_path.rglob("escaped"))
    assert not (checkpoint_root(run_dir) / UNIVERSAL_DIR / tag.name / "zero").exists()


def test_a_foreign_checkpoint_is_converted_into_the_resuming_run_not_beside_it(trained, tmp_path):
    """train.resume=<another run's checkpoint> at another layout: the conversion goes into this run's directory;
    the other run's directory (which may be read-only, or someone else's) is not written."""
    from pipeline.checkpoint.universal import to_universal

    _, other_run, tag = copy_run(trained, tmp_path)
    before = sorted(str(p.relative_to(other_run)) for p in other_run.rglob("*"))
    mine = tmp_path / "mine" / "runs" / "m"
    out = to_universal(tag, mine)
    assert out == checkpoint_root(mine) / UNIVERSAL_DIR / tag.name
    assert sorted(str(p.relative_to(other_run)) for p in other_run.rglob("*")) == before
