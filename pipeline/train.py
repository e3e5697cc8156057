"""The train stage on the driver: resolve the job, open the MLflow run, launch workers with Ray Train."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pipeline.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    fingerprint,
    flatten,
    grad_accumulation_steps,
)
from pipeline.train_loop import TrainJob, TrainOutcome

log = logging.getLogger(__name__)


def run_dir_for(cfg: PipelineConfig) -> Path:
    return Path(cfg.output_dir) / "runs" / cfg.run_name


def model_for_data(model: ModelConfig, vocab_size: int) -> ModelConfig:
    """The model config with its vocabulary taken from the tokenizer when not set."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=vocab_size)
    if model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size}): "
            f"leave model.vocab_size unset (null) to follow the tokenizer, or set it to >= {vocab_size}."
        )
    return model


def math_fingerprint(cfg: PipelineConfig, data_dir: Path) -> str:
    """What changes the numbers a run computes (not logging, not where it saves)."""
    train = asdict(cfg.train)
    for key in ("log_interval_steps", "save_interval_steps", "keep_last_checkpoints", "resume", "eval_interval_steps", "peak_tflops"):
        train.pop(key)
    return fingerprint({"model": asdict(cfg.model), "train": train, "data": str(data_dir)})


def build_job(cfg: PipelineConfig, data_dir: Path, tracking_uri: str | None, run_id: str | None) -> TrainJob:
    from data_prep.shards import load_manifest
    from pipeline.ds_config import make_ds_config, resolve_precision
    from pipeline.model_size import training_flops_per_token

    manifest = load_manifest(data_dir)
    if manifest.window_length != cfg.model.context_length + 1:
        raise ConfigError(
            f"the data set {data_dir} holds windows of {manifest.window_length} tokens but the model needs "
            f"model.context_length + 1 = {cfg.model.context_length + 1}: prepare the data with the same "
            f"context_length."
        )
    model = model_for_data(cfg.model, manifest.vocab_size)
    precision = resolve_precision(cfg.parallel)
    accum = grad_accumulation_steps(cfg.train, cfg.parallel, model.context_length)
    return TrainJob(
        model=model,
        train=cfg.train,
        parallel=cfg.parallel,
        data_dir=str(data_dir),
        run_dir=str(run_dir_for(cfg)),
        precision=precision,
        grad_accum_steps=accum,
        ds_config=make_ds_config(cfg.train, cfg.parallel, precision, accum),
        flops_per_token=training_flops_per_token(model),
        config_fingerprint=math_fingerprint(cfg, data_dir),
        tokenizer_sha256=manifest.tokenizer_sha256,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
    )


OUTCOME_FILE = "train_outcome.json"


def _ray_worker(config: dict) -> None:
    import torch.distributed as dist

    from data_prep.shards import write_atomic
    from pipeline.train_loop import train_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job: TrainJob = config["job"]
    outcome = train_worker(job)
    # Ray Train only hands metrics back with a Ray checkpoint; our checkpoints are DeepSpeed's, so rank 0
    # leaves its outcome in the run directory for the driver.
    if dist.get_rank() == 0:
        write_atomic(Path(job.run_dir) / OUTCOME_FILE, json.dumps(asdict(outcome)))


def launch_ray(job: TrainJob, run_dir: Path, max_failures: int = 0) -> TrainOutcome:
    """Run train_worker on parallel.num_workers Ray Train workers and return rank 0's outcome."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    parallel = job.parallel
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=parallel.num_workers,
            use_gpu=parallel.use_gpu,
            resources_per_worker={"CPU": parallel.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if parallel.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    outcome_file = run_dir / OUTCOME_FILE
    outcome_file.unlink(missing_ok=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    outcome = json.loads(outcome_file.read_text())
    outcome["losses"] = {int(k): v for k, v in outcome["losses"].items()}
    return TrainOutcome(**outcome)


def open_run(cfg: PipelineConfig, job: TrainJob, data_dir: Path):
    """Open (or re-open) the MLflow run of this training job and record what defines it."""
    from pipeline.tracking import Tracker

    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(cfg), cfg.run_name)
    tracker.log_params(flatten(cfg))
    tracker.log_params({
        "resolved.vocab_size": job.model.vocab_size,
        "resolved.precision": job.precision,
        "resolved.grad_accum_steps": job.grad_accum_steps,
        "resolved.data_dir": job.data_dir,
        "resolved.config_fingerprint": job.config_fingerprint,
    })
    tracker.set_tags({"stage": "train", "data_dir": str(data_dir)})
    tracker.log_artifact(data_dir / "tokenizer.model", "tokenizer")
    return tracker


def train(cfg: PipelineConfig, data_dir: Path) -> TrainOutcome:
    run_dir = run_dir_for(cfg)
    job = build_job(cfg, data_dir, None, None)
    tracker = open_run(cfg, job, data_dir)
    job = dataclasses.replace(job, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id)
    log.info(
        "training %s: %d workers (tp=%d), ZeRO-%d, %s, %d grad-accumulation steps, run dir %s",
        cfg.run_name, cfg.parallel.num_workers, cfg.parallel.tensor_parallel, cfg.parallel.zero_stage,
        job.precision, job.grad_accum_steps, run_dir,
    )
    try:
        outcome = launch_ray(job, run_dir)
    except BaseException:
        tracker.close("FAILED")
        raise
    finish_run(tracker, outcome, run_dir, cfg.run_name)
    return outcome


def finish_run(tracker, outcome: TrainOutcome, run_dir: Path, run_name: str) -> None:
    """Record the checkpoint and the loss curve, and mark the MLflow run finished."""
    from pipeline.plots import plot_loss_curve

    tracker.set_tags({"checkpoint": outcome.checkpoint})
    history = tracker.client.get_metric_history(tracker.run_id, "train_loss")
    if history:
        points = sorted((m.step, m.value) for m in history)
        path = plot_loss_curve([s for s, _ in points], [v for _, v in points], run_dir / "loss_curve.png", run_name)
        tracker.log_artifact(path, "plots")
    tracker.close()
    log.info("training finished at step %d; checkpoint %s", outcome.final_step, outcome.checkpoint)
