"""The train stage on the driver: resolve the job, decide the resume, open the MLflow run, launch workers.

    train(cfg, data_dir): build_job -> check_resume -> open_run -> launch_ray (under PreemptionForwarder)
                          -> finish_run
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path

import numpy as np

from data_prep.blend import component_dirs, is_blend, load_blend, load_data_info, open_split
from data_prep.shards import check_dataset_checksums
from pipeline.checkpoint.resume import plan_resume
from pipeline.cluster.storage import store_for
from pipeline.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    PipelineError,
    fingerprint,
    flatten,
    grad_accumulation_steps,
    resume_fields,
    run_dir_for,
)
from pipeline.containment import regular_file
from pipeline.model.size import attended_context, model_for_data, training_flops_per_token
from pipeline.tracking import Tracker
from pipeline.train.ds_config import make_ds_config, resolve_precision
from pipeline.train.job import TrainJob, TrainOutcome
from pipeline.train.plan import check_layout_fits
from pipeline.train.plots import plot_loss_curve
from pipeline.train.preemption import Preempted, PreemptionForwarder
from pipeline.train.ray_launch import launch_ray
from pipeline.train.startup import process_start_time, report_startup

log = logging.getLogger(__name__)


def math_config(cfg: PipelineConfig, model: ModelConfig, data_dir: Path, precision: str, tokenizer_sha256: str) -> dict:
    """What changes the numbers a run computes (not logging, not where it saves): the model and train fields as
    their `resume` metadata says (pipeline.config.resume_fields; the run's length counts unless the schedule is
    constant), the data set, the precision and the tokenizer."""
    return {**resume_fields(cfg.train, model), "data": data_dir.name, "precision": precision,
            "tokenizer_sha256": tokenizer_sha256}


def check_resume(cfg: PipelineConfig, job: TrainJob) -> TrainJob:
    """The job with the resume decided on the driver (pipeline.checkpoint.resume.plan_resume): the checkpoint
    the workers load, and DeepSpeed's universal loading when the parallel layout changed."""
    plan = plan_resume(cfg.train, cfg.parallel, run_dir_for(cfg), job.math_config, store_for(cfg.cluster.storage_uri))
    if plan.universal:
        return dataclasses.replace(job, resume_from=str(plan.checkpoint),
                                   ds_config={**job.ds_config, "checkpoint": {"load_universal": True}})
    return dataclasses.replace(job, resume_from=str(plan.checkpoint) if plan.checkpoint is not None else None)


ATTENDED_CONTEXT_SAMPLE = 1024  # training windows read to measure document-masked attention's context


def measured_attended_context(model: ModelConfig, data_dir: Path) -> float | None:
    """Under document masking, the context attention computes over per token, measured on evenly spaced
    training windows (pipeline.model.size.attended_context); None without document masking."""
    if not model.document_mask:
        return None
    import numpy as np

    windows = open_split(data_dir, "train")
    picked = np.unique(np.linspace(0, len(windows) - 1, min(len(windows), ATTENDED_CONTEXT_SAMPLE)).astype(np.int64))
    context = attended_context(windows.windows(picked)[:, :-1], model.eos_id)
    log.info("document masking: attention spans %.1f of %d positions per token on average (FLOPs and MFU count "
             "that)", context, model.context_length)
    return context


def build_job(cfg: PipelineConfig, data_dir: Path, tracking_uri: str | None, run_id: str | None) -> TrainJob:
    manifest = load_data_info(data_dir)
    if cfg.data.verify_checksums:
        t0 = time.time()
        hashed = sum(check_dataset_checksums(d) for d in component_dirs(data_dir))
        if hashed:
            log.info("verified the sha256 of %d files of %s in %.1fs", hashed, data_dir, time.time() - t0)
    if manifest.window_length != cfg.model.context_length + 1:
        raise ConfigError(
            f"the data set {data_dir} holds windows of {manifest.window_length} tokens but the model needs "
            f"model.context_length + 1 = {cfg.model.context_length + 1}: prepare the data with the same "
            f"context_length."
        )
    model = model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id)
    # Again with the data set's own vocabulary (the stage planned with the config's): a data set that declares
    # a huge vocabulary must not make every rank allocate its embedding.
    check_layout_fits(model, cfg.parallel, cfg.train, resolve_precision(cfg.parallel), cfg.cluster.workers_per_node)
    if cfg.train.optimizer == "muon" and cfg.train.grad_clip:
        log.warning("train.grad_clip=%g is not applied with train.optimizer=muon (see TrainConfig.muon_lr)",
                    cfg.train.grad_clip)
    precision = resolve_precision(cfg.parallel)
    accum = grad_accumulation_steps(cfg.train, cfg.parallel, model.context_length)
    math = math_config(cfg, model, data_dir, precision, manifest.tokenizer_sha256)
    return TrainJob(
        model=model,
        train=cfg.train,
        parallel=cfg.parallel,
        data_dir=str(data_dir),
        run_dir=str(run_dir_for(cfg)),
        storage_uri=cfg.cluster.storage_uri,
        precision=precision,
        grad_accum_steps=accum,
        ds_config=make_ds_config(cfg.train, cfg.parallel, precision, accum, d_model=model.d_model),
        flops_per_token=training_flops_per_token(model, measured_attended_context(model, data_dir)),
        config_fingerprint=fingerprint(math),
        math_config=math,
        tokenizer_sha256=manifest.tokenizer_sha256,
        eval_max_tokens=cfg.eval.max_tokens,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
        job_id=uuid.uuid4().hex,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
    )


# The run's description in MLflow (its Overview page): what each metric measures, in which unit.
METRICS_GUIDE = """Metrics and their units:
- train_loss, val_loss (and val_loss.<source>), unigram_val_loss: cross-entropy in nats per token
  (train_loss: mean over the steps since the last log; val_loss: over the eval.max_tokens validation budget).
- val_perplexity: exp(val_loss); val_bits_per_byte: bits per UTF-8 byte of validation text.
- z_loss: mean log^2 Z of the softmax normaliser (when model.z_loss > 0).
- tokens_per_s: training tokens per second over all workers; step_time_s: seconds of the logged step;
  val_tokens_per_s: validation tokens scored per second on the workers.
- mfu: model FLOPs utilisation, a fraction of the peak in the tag mfu_peak (TFLOP/s per worker).
- memory_mb: rank 0's peak GPU memory allocated (on CPU: its process's peak resident set), MiB;
  grad_norm: L2 norm of the gradients before clipping.
- tokens_seen: tokens trained on; data_epochs: passes over the training windows (repeated data past 1);
  data_share.<source>, data_epochs.<source>: a mixture's shares and epochs.
- tags startup/<phase>_s: seconds of each start-up phase of the latest launch; system/...: MLflow's system
  metrics of rank 0's node (units in their names), system/node<k>/...: those of the run's node k.
"""


def open_run(cfg: PipelineConfig, job: TrainJob, data_dir: Path, tags: dict[str, str] | None = None):
    """Open (or re-open) the MLflow run of this training job and record what defines it."""
    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(cfg), cfg.run_name, tags=tags, background=True)
    tracker.log_params(flatten(cfg))
    tracker.log_params({
        "resolved.vocab_size": job.model.vocab_size,
        "resolved.precision": job.precision,
        "resolved.grad_accum_steps": job.grad_accum_steps,
        "resolved.data_dir": job.data_dir,
        "resolved.config_fingerprint": job.config_fingerprint,
    })
    tracker.set_tags({"stage": "train", "data_dir": str(data_dir), "mlflow.note.content": METRICS_GUIDE})
    # Under document masking the attention term counts the attended context measured on the data.
    tracker.log_params({"resolved.flops_per_token": f"{job.flops_per_token:.6g}"})
    if is_blend(data_dir):
        blend = load_blend(data_dir)
        tracker.log_params({f"resolved.blend.{c.name}": f"share {c.share:.6g} of {blend.component_dir(c).name}"
                            for c in blend.components})
    tokenizer = regular_file(load_data_info(data_dir).tokenizer_path, "the data set's tokenizer",
                             f"a data set holds its tokenizer as a regular file: prepare {data_dir} again")
    tracker.log_artifact(tokenizer, "tokenizer")
    return tracker


def train(cfg: PipelineConfig, data_dir: Path, tags: dict[str, str] | None = None) -> TrainOutcome:
    run_dir = run_dir_for(cfg)
    job = check_resume(cfg, build_job(cfg, data_dir, None, None))
    tracker = open_run(cfg, job, data_dir, tags)
    job = dataclasses.replace(job, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id)
    log.info(
        "training %s: %d workers (tp=%d), ZeRO-%d, %s, %d grad-accumulation steps, run dir %s",
        cfg.run_name, cfg.parallel.num_workers, cfg.parallel.tensor_parallel, cfg.parallel.zero_stage,
        job.precision, job.grad_accum_steps, run_dir,
    )
    launched = time.time()
    try:
        with PreemptionForwarder(run_dir) as forwarder:
            outcome = launch_ray(job, run_dir, max_failures=cfg.train.max_failures,
                                 placement_strategy=cfg.cluster.placement_strategy,
                                 workers_per_node=cfg.cluster.workers_per_node)
    except BaseException:
        tracker.close("FAILED")
        raise
    if outcome.failure:
        tracker.set_tags({"failure": outcome.failure[:5000]})
        tracker.close("FAILED")
        raise TrainingFailed(outcome.failure)
    if outcome.preempted:
        tracker.set_tags({"checkpoint": outcome.checkpoint})
        tracker.close("KILLED")
        forwarder.hand_over()  # e.g. submitit requeues the job here (and exits)
        raise Preempted(outcome)
    report_startup(outcome.timeline | {"process_start": process_start_time(), "launched": launched,
                                       "returned": time.time()}, tracker, outcome.final_step)
    finish_run(tracker, outcome, run_dir, cfg.run_name, unigram_baseline(cfg, data_dir, job.model.vocab_size))
    return outcome


class TrainingFailed(PipelineError, RuntimeError):
    """The workers stopped the run (e.g. it diverged); the message says at which step and what to do."""


def unigram_baseline(cfg: PipelineConfig, data_dir: Path, vocab_size: int) -> float | None:
    """The unigram model's validation loss over the evaluation budget, from the token counts prepare stored."""
    from pipeline.data.validation import train_token_counts, unigram_totals

    val = open_split(data_dir, "validation")
    if not len(val):
        return None
    counts = train_token_counts(data_dir, vocab_size)
    return unigram_totals(counts, val, cfg.eval.max_tokens, np.zeros(vocab_size, dtype=np.int64)).mean_loss


def finish_run(tracker, outcome: TrainOutcome, run_dir: Path, run_name: str, unigram: float | None = None) -> None:
    """Record the checkpoint and the loss curve (training, validation, unigram baseline), and mark the MLflow run
    finished."""
    tracker.set_tags({"checkpoint": outcome.checkpoint})
    if outcome.worker_nodes:
        tracker.set_tags({"ray_worker_nodes": ",".join(outcome.worker_nodes)})
    history = tracker.client.get_metric_history(tracker.run_id, "train_loss")
    if history:
        points = sorted((m.step, m.value) for m in history)
        val = sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, "val_loss"))
        path = plot_loss_curve([s for s, _ in points], [v for _, v in points], run_dir / "loss_curve.png", run_name,
                               val, unigram)
        tracker.log_artifact(path, "plots")
    tracker.close()
    log.info("training finished at step %d; checkpoint %s", outcome.final_step, outcome.checkpoint)
