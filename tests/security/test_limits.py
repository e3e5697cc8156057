"""Limits a config may not break: the memory a layout needs against what a rank has (on CPU the host's RAM,
shared by the ranks of one machine), DeepSpeed settings that would contradict the pipeline's own or write files
outside output_dir, and numbers that are NaN, infinite or out of range. Each is refused before any work starts,
naming the field and the fix."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.compose import compose_config
from pipeline.config import (
    ConfigError,
    ParallelConfig,
    PipelineConfig,
    SourceConfig,
    SweepRun,
    TrainConfig,
    validate,
    validate_deepspeed,
)
from pipeline.train.ds_config import make_ds_config

HOST_GIB = psutil.virtual_memory().total / 2**30


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, **(env or {})})


# --- resources: memory planned against the host's RAM on CPU -----------------------------------------------------


def test_plan_refuses_a_model_larger_than_the_hosts_ram(tmp_path):
    out = cli("plan", "model.n_layer=100000", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"host RAM {HOST_GIB:.1f} GiB / 2 ranks" in out.stdout
    assert "verdict: does not fit: 686.1 GiB per rank" in out.stdout
    # One rank per machine has the whole host; a layout of 4 ranks with 2 per machine shares it by 2.
    out = cli("plan", "model.n_layer=100000", "parallel.num_workers=4", "cluster.workers_per_node=2", cwd=tmp_path)
    assert out.returncode == 1 and f"host RAM {HOST_GIB:.1f} GiB / 2 ranks" in out.stdout, out.stdout


def test_the_default_tiny_model_fits_with_a_wide_margin(tmp_path):
    """What `make run` trains: about 0.1 GiB per rank against ~10 GiB (90% of half of a 23 GiB machine)."""
    out = cli("plan", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    planned, usable = map(float, re.search(r"fits: ([\d.]+) GiB per rank <= ([\d.]+) GiB", out.stdout).groups())
    assert planned < 0.5 and planned < usable / 10, out.stdout


def test_gpt3_175b_still_counts_and_plans_on_cpu(tmp_path):
    params = cli("params", "model=gpt3_175b", cwd=tmp_path)
    assert params.returncode == 0 and "175,221,817,344" in params.stdout, params.stderr
    plan = cli("plan", "model=gpt3_175b", cwd=tmp_path)
    assert plan.returncode == 1 and "memory per rank" in plan.stdout and "does not fit" in plan.stdout


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline and proc.pid != os.getpid():
            found.append(cmdline)
    return found


def test_train_refuses_a_model_larger_than_the_host_before_ray_starts(tmp_path):
    """Ray alone takes longer than this refusal to start on 2 cores (and prepare, the driver's imports and the
    workers' allocation come after it): nothing of Ray exists afterwards, nothing was written."""
    ray_tmp = tmp_path / "ray"
    started = time.time()
    out = cli("train", "model.n_layer=100000", f"output_dir={tmp_path / 'out'}", cwd=tmp_path,
              env={"RAY_TMPDIR": str(ray_tmp)})
    elapsed = time.time() - started
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not fit the memory of a rank" in out.stderr and f"host RAM {HOST_GIB:.1f} GiB / 2 ranks" in out.stderr
    assert "parallel.check_memory=false" in out.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not ray_tmp.exists() and not (tmp_path / "out").exists()
    assert _processes_mentioning(str(tmp_path)) == []


# --- passthrough: parallel.deepspeed holds expert settings only --------------------------------------------------


def nested(dotted: str, value) -> dict:
    """{"a": {"b": value}} from "a.b"."""
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


OWNED = [
    ("zero_optimization.stage", 3, "parallel.zero_stage=1"),
    ("train_batch_size", 64, "train.global_batch_tokens=4096"),
    ("gradient_accumulation_steps", 4, "train.global_batch_tokens=4096"),
    ("train_micro_batch_size_per_gpu", 2, "train.micro_batch_size=8"),
    ("elasticity.enabled", True, "train.global_batch_tokens=4096"),
    ("gradient_clipping", 0.0, "train.grad_clip=1.0"),
    ("bf16.enabled", True, "parallel.precision=auto"),
    ("bfloat16.enabled", True, "parallel.precision=auto"),
    ("fp16.enabled", True, "parallel.precision=auto"),
    ("torch_autocast.enabled", False, "parallel.precision=auto"),
    ("data_types.grad_accum_dtype", "bf16", "parallel.precision=auto"),
    ("communication_data_type", "bf16", "parallel.precision=auto"),
    ("tensor_parallel.autotp_size", 2, "parallel.tensor_parallel=1"),
    ("optimizer.type", "Adam", "train.optimizer=adamw"),
    ("scheduler.type", "WarmupLR", "train.schedule=cosine"),
    ("zero_allow_untested_optimizer", False, "train.optimizer=adamw"),
    ("zero_optimization.offload_optimizer.device", "cpu", "parallel.offload_optimizer=False"),
    ("checkpoint.load_universal", True, "train.resume=auto"),
    ("checkpoint.tag_validation", "Ignore", "train.resume=auto"),
    ("zero_optimization", None, "parallel.zero_stage=1"),  # null would wipe the whole section, stage included
]


@pytest.mark.parametrize("key,value,owner", OWNED, ids=[k for k, _, _ in OWNED])
def test_deepspeed_settings_the_pipeline_owns_are_refused_naming_both(key, value, owner):
    with pytest.raises(ConfigError) as err:
        validate_deepspeed(ParallelConfig(deepspeed=nested(key, value)), TrainConfig())
    message = str(err.value)
    assert f"parallel.deepspeed.{key}=" in message and f"contradicts {owner}" in message
    field = owner.split("=")[0]
    assert f"set {field} instead" in message or "drop the key" in message


WRITERS = [
    ("tensorboard.output_path", "/etc/cron.d"),
    ("tensorboard.enabled", True),
    ("wandb.enabled", True),
    ("csv_monitor.output_path", "/tmp/elsewhere"),
    ("comet.enabled", True),
    ("flops_profiler.output_file", "/root/.bashrc"),
    ("autotuning.results_dir", "/tmp/tuning"),
    ("nebula.persistent_storage_path", "/tmp/nebula"),
]


@pytest.mark.parametrize("key,value", WRITERS, ids=[k for k, _ in WRITERS])
def test_deepspeed_settings_that_write_files_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"parallel\.deepspeed\.{re.escape(key)}=.*MLflow.*below output_dir"):
        validate_deepspeed(ParallelConfig(deepspeed=nested(key, value)), TrainConfig())


def test_expert_settings_stay_allowed_and_merge():
    expert = {"zero_optimization": {"reduce_bucket_size": 50_000_000, "overlap_comm": True,
                                    "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}},
              "wall_clock_breakdown": True, "flops_profiler": {"enabled": True, "profile_step": 3}}
    parallel = ParallelConfig(zero_stage=3, deepspeed=expert)
    validate_deepspeed(parallel, TrainConfig())
    config = make_ds_config(TrainConfig(), parallel, "fp32", 1, d_model=128)
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert config["zero_optimization"]["offload_param"]["nvme_path"] == "/local_nvme"
    assert config["flops_profiler"] == {"enabled": True, "profile_step": 3} and config["wall_clock_breakdown"] is True


# What make_ds_config generates that an expert may still tune: communication buckets, ZeRO-3's prefetch and
# partitioning thresholds, pinned offload memory, DeepSpeed's own console logging.
TUNABLE = re.compile(r"zero_optimization\.(reduce_bucket_size|stage3_\w+|sub_group_size|offload_optimizer\.pin_memory)"
                     r"|steps_per_print|wall_clock_breakdown")


def leaves(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_setting_the_pipeline_generates_is_owned_or_tunable():
    """Keeps the table of owned keys true: a key that make_ds_config (or the driver's universal loading) starts
    to set must be owned by a field, or be listed above as an expert's to tune."""
    train = TrainConfig()
    layouts = [ParallelConfig(num_workers=4, zero_stage=stage, tensor_parallel=tp, offload_optimizer=offload)
               for stage in (0, 1, 2, 3) for tp in (1, 2) for offload in (False, True)
               if not (tp > 1 and stage == 3) and not (offload and stage == 0)]
    generated = {"checkpoint.load_universal": True}
    for parallel in layouts:
        for precision in ("fp32", "bf16", "fp16"):
            generated |= dict(leaves(make_ds_config(train, parallel, precision, 2, d_model=256)))
    untracked = []
    for key, value in generated.items():
        try:
            validate_deepspeed(ParallelConfig(deepspeed=nested(key, value)), train)
        except ConfigError:
            continue
        if not TUNABLE.fullmatch(key):
            untracked.append(key)
    assert untracked == []


def test_the_cli_refuses_a_contradicting_setting_before_any_work(tmp_path):
    out = cli("train", "+parallel.deepspeed.zero_optimization.stage=3", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert out.returncode == 2
    assert ("parallel.deepspeed.zero_optimization.stage=3 contradicts parallel.zero_stage=1" in out.stderr
            and "set parallel.zero_stage instead" in out.stderr), out.stderr[-3000:]
    out = cli("train", "+parallel.deepspeed.tensorboard.enabled=true",
              f"+parallel.deepspeed.tensorboard.output_path={tmp_path / 'tb'}", f"output_dir={tmp_path / 'out'}",
              cwd=tmp_path)
    assert out.returncode == 2 and "logs metrics to MLflow" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()


# --- numbers: finite and in range ---------------------------------------------------------------------------------

NUMERIC = re.compile(r"\b(int|float)\b")
# Fields where -1 has a meaning of its own (each says why); every other numeric field refuses it.
MINUS_ONE_ALLOWED = {
    "train.max_failures": "Ray Train's FailureConfig: -1 recovers from any number of worker-group failures",
}


def numeric_fields(obj, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted name, is a list) of every int/float field below obj, through nested dataclasses and the first
    item of lists of dataclasses."""
    found = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += numeric_fields(value, f"{name}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            found += numeric_fields(value[0], f"{name}.0.")
        elif NUMERIC.search(str(f.type)) and "bool" not in str(f.type):
            found.append((name, str(f.type).startswith("list")))
    return found


def set_field(cfg, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    obj = cfg
    for part in parents:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    setattr(obj, last, value)


@pytest.fixture(scope="module")
def full_config(tmp_path_factory) -> PipelineConfig:
    """The default config with a mixture source and a planned sweep run, so that every dataclass is reachable."""
    cfg = compose_config([f"output_dir={tmp_path_factory.mktemp('out')}"], stage="train")
    cfg.data.source, cfg.data.mixture = "mixture", [SourceConfig(name="plays", source="shakespeare")]
    cfg.sweep.runs = [SweepRun(d_model=32, tokens=100_000, budget_flops=1e12, lr=1e-3)]
    validate(cfg)
    return cfg


def test_every_numeric_field_refuses_nan_and_out_of_range_values_by_name(full_config):
    fields = numeric_fields(full_config)
    assert len(fields) > 60 and ("train.lr", False) in fields and ("sweep.runs.0.lr", False) in fields
    unchecked = []
    for name, is_list in fields:
        for bad in (math.nan, -1):
            if bad == -1 and name in MINUS_ONE_ALLOWED:
                continue
            cfg = copy.deepcopy(full_config)
            set_field(cfg, name, [bad] if is_list else bad)
            try:
                validate(cfg)
                unchecked.append(f"{name}={bad}: accepted")
            except ConfigError as err:
                if name not in str(err):
                    unchecked.append(f"{name}={bad}: refused without naming it: {err}")
    assert unchecked == []


@pytest.mark.parametrize("name", sorted(MINUS_ONE_ALLOWED))
def test_minus_one_where_it_has_a_meaning_and_nothing_below(full_config, name):
    cfg = copy.deepcopy(full_config)
    set_field(cfg, name, -1)
    validate(cfg)
    set_field(cfg, name, -2)
    with pytest.raises(ConfigError, match=re.escape(name)):
        validate(cfg)


@pytest.mark.parametrize("override,message", [
    ("train.lr=nan", "train.lr=nan: not a finite number"),
    ("train.beta2=inf", "train.beta2=inf: not a finite number"),
    ("tracking.system_metrics_interval_s=-inf", "tracking.system_metrics_interval_s=-inf: not a finite number"),
    ("train.eval_interval_steps=-5", "train.eval_interval_steps=-5 must be a finite number >= 0"),
    ("train.beta1=1.0", "train.beta1=1.0 must be in [0, 1)"),
    ("cluster.connect_timeout_s=0", "cluster.connect_timeout_s=0.0 must be positive"),
])
def test_the_cli_refuses_bad_numbers_naming_the_field(tmp_path, override, message):
    out = cli("train", override, f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["curriculum_learning.enabled", "data_efficiency.enabled", "progressive_layer_drop.enabled",
                                 "zero_optimization.mics_shard_size", "prescale_gradients", "eigenvalue.enabled"])
def test_deepspeed_features_that_change_the_math_or_the_layout_are_refused(key):
    """They would train (or partition) otherwise than the run records in its config and checkpoints."""
    with pytest.raises(ConfigError, match=rf"parallel\.deepspeed\.{re.escape(key)}="):
        validate_deepspeed(ParallelConfig(deepspeed=nested(key, True)), TrainConfig())
