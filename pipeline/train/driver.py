"""The train stage on the driver: resolve the run's spec (once), open the MLflow run, launch the workers, conclude.

    train(cfg, data_dir): resolve_run -> open_run -> launch_ray (under PreemptionForwarder) -> conclude_run
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_prep.blend import component_dirs, is_blend, load_blend, load_data_info, open_split
from data_prep.shards import check_dataset_checksums
from pipeline.checkpoint.resume import resume_source
from pipeline.cluster.ray_runtime import check_nodes_share
from pipeline.cluster.storage import mirror_for
from pipeline.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    PipelineError,
    fingerprint,
    flatten,
    resume_fields,
    run_dir_for,
)
from pipeline.containment import regular_file
from pipeline.model.size import attended_context, model_for_data, training_flops_per_token
from pipeline.tracking import RUN_ID_FILE, Tracker, tracking_uri
from pipeline.train.plots import plot_loss_curve
from pipeline.train.preemption import Preempted, PreemptionForwarder, actor_name
from pipeline.train.ray_launch import launch_ray
from pipeline.train.run_spec import RunLink, RunSpec, TrainOutcome, resolve_layout
from pipeline.train.startup import process_start_time, report_startup

log = logging.getLogger(__name__)


def math_config(cfg: PipelineConfig, model: ModelConfig, data_dir: Path, precision: str, tokenizer_sha256: str) -> dict:
    """What changes the numbers a run computes (not logging, not where it saves): the model and train fields as
    their `resume` metadata says (pipeline.config.resume_fields; the run's length counts unless the schedule is
    constant), the data set, the precision and the tokenizer."""
    return {**resume_fields(cfg.train, model), "data": data_dir.name, "precision": precision,
            "tokenizer_sha256": tokenizer_sha256}


def decide_resume(cfg: PipelineConfig, math: dict, ds_config: dict) -> tuple[str | None, dict]:
    """train.resume decided on the driver (pipeline.checkpoint.resume.resume_source): the checkpoint the workers
    load, and the DeepSpeed config to load it with (universal loading when the parallel layout changed)."""
    source = resume_source(cfg.train, cfg.parallel, run_dir_for(cfg), math, mirror_for(cfg))
    if source.universal:
        ds_config = {**ds_config, "checkpoint": {"load_universal": True}}
    return (str(source.checkpoint) if source.checkpoint is not None else None), ds_config


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


def check_data(cfg: PipelineConfig, data_dir: Path):
    """The data set's manifest, its files' sha256 checked (data.verify_checksums) and its windows matching the
    model's context."""
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
    return manifest


def warn_other_tokenizer(init_from: str, manifest) -> None:
    """A warning when the data set was not tokenized with model.init_from's own tokenizer: its ids would mean other
    tokens than the ones the checkpoint learned."""
    from data_prep.hf_tokenizer import HFTokenizerSource
    from data_prep.tokenizer import TokenizerError

    try:
        same = hashlib.sha256(HFTokenizerSource(init_from).data).hexdigest() == manifest.tokenizer_sha256
    except (TokenizerError, ConfigError, OSError) as err:
        log.warning("model.init_from=%s: its tokenizer cannot be compared with the data set's (%s)", init_from, err)
        return
    if not same:
        log.warning("model.init_from=%s: the data set was tokenized with another tokenizer (its %s) than the "
                    "checkpoint's: its ids mean other tokens than the ones the checkpoint learned; prepare the data "
                    "with data.tokenizer.hf=%s", init_from, manifest.tokenizer_file, init_from)


def resolve_run(cfg: PipelineConfig, data_dir: Path) -> RunSpec:
    """The validated config and the prepared data set turned into the complete, frozen spec of the run every launcher runs
    (the Ray driver, `pipeline.launch`): the model at the data set's vocabulary, its layout (`resolve_layout`,
    again with that vocabulary: a data set that declares a huge one must not make every rank allocate its
    embedding), the math fingerprint, the resume point and a new launch id."""
    manifest = check_data(cfg, data_dir)
    layout = resolve_layout(cfg, model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id))
    model = layout.model
    if model.init_from is not None:
        warn_other_tokenizer(model.init_from, manifest)
    if cfg.train.downstream_interval_steps:  # before any worker starts: unknown or generation tasks are refused
        import tempfile

        from pipeline.data.downstream import refuse_generation_tasks, task_manager

        with tempfile.TemporaryDirectory(prefix="lm_eval_tasks-") as scratch:
            refuse_generation_tasks(task_manager(Path(scratch), cfg.eval.tasks), cfg.eval.tasks)
    if cfg.train.optimizer == "muon" and cfg.train.grad_clip:
        log.warning("train.grad_clip=%g is not applied with train.optimizer=muon (see TrainConfig.muon_lr)",
                    cfg.train.grad_clip)
    math = math_config(cfg, model, data_dir, layout.precision, manifest.tokenizer_sha256)
    resume_from, ds_config = decide_resume(cfg, math, layout.ds_config)
    return RunSpec(
        model=model,
        train=cfg.train,
        parallel=cfg.parallel,
        data_dir=str(data_dir),
        run_dir=str(run_dir_for(cfg)),
        storage_uri=cfg.cluster.storage_uri,
        background_uploads=cfg.cluster.background_uploads,
        local_checkpoints=cfg.cluster.local_checkpoints,
        precision=layout.precision,
        grad_accum_steps=layout.grad_accum_steps,
        ds_config=ds_config,
        flops_per_token=training_flops_per_token(model, measured_attended_context(model, data_dir)),
        config_fingerprint=fingerprint(math),
        math_config=math,
        tokenizer_sha256=manifest.tokenizer_sha256,
        resume_from=resume_from,
        eval_max_tokens=cfg.eval.max_tokens,
        downstream_tasks=list(cfg.eval.tasks) if cfg.train.downstream_interval_steps else [],
        downstream_limit=cfg.eval.tasks_limit,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
        launch_id=uuid.uuid4().hex,
    )


# The run's description in MLflow (its Overview page): what each metric measures, in which unit.
METRICS_GUIDE = """Metrics and their units:
- train_loss, val_loss (and val_loss.<source>), unigram_val_loss: cross-entropy in nats per token
  (train_loss: mean over the steps since the last log; val_loss: over the eval.max_tokens validation budget).
- val_perplexity: exp(val_loss); val_bits_per_byte: bits per UTF-8 byte of validation text.
- z_loss: mean log^2 Z of the softmax normaliser (when model.z_loss > 0).
- tokens_per_s: training tokens per second over all workers; step_time_s: seconds of the logged step;
  val_tokens_per_s: validation tokens scored per second on the workers.
- lm_eval.<task>.<metric>: lm-eval-harness scores (accuracy, a fraction) on the workers during training
  (train.downstream_interval_steps) and at pipeline evaluate.
- mfu: model FLOPs utilisation, a fraction of the peak in the tag mfu_peak (TFLOP/s per worker).
- memory_mb: rank 0's peak GPU memory allocated (on CPU: its process's peak resident set), MiB;
  grad_norm: L2 norm of the gradients before clipping.
- tokens_seen: tokens trained on; data_epochs: passes over the training windows (repeated data past 1);
  data_share.<source>, data_epochs.<source>: a mixture's shares and epochs.
- tags startup/<phase>_s: seconds of each start-up phase of the latest launch; system/...: MLflow's system
  metrics of rank 0's node (units in their names), system/node<k>/...: those of the run's node k.
"""


def open_run(cfg: PipelineConfig, spec: RunSpec, data_dir: Path, tags: dict[str, str] | None = None):
    """Open (or re-open) the MLflow run of this training run and record what defines it."""
    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(cfg), cfg.run_name, tags=tags, background=True)
    tracker.log_params(flatten(cfg))
    tracker.log_params({
        "resolved.vocab_size": spec.model.vocab_size,
        "resolved.precision": spec.precision,
        "resolved.grad_accum_steps": spec.grad_accum_steps,
        "resolved.data_dir": spec.data_dir,
        "resolved.config_fingerprint": spec.config_fingerprint,
    })
    tracker.set_tags({"stage": "train", "data_dir": str(data_dir), "mlflow.note.content": METRICS_GUIDE})
    # Under document masking the attention term counts the attended context measured on the data.
    tracker.log_params({"resolved.flops_per_token": f"{spec.flops_per_token:.6g}"})
    if is_blend(data_dir):
        blend = load_blend(data_dir)
        tracker.log_params({f"resolved.blend.{c.name}": f"share {c.share:.6g} of {blend.component_dir(c).name}"
                            for c in blend.components})
    tokenizer = regular_file(load_data_info(data_dir).tokenizer_path, "the data set's tokenizer",
                             f"a data set holds its tokenizer as a regular file: prepare {data_dir} again")
    tracker.log_artifact(tokenizer, "tokenizer")
    return tracker


def train(cfg: PipelineConfig, data_dir: Path, tags: dict[str, str] | None = None) -> TrainOutcome:
    """The train stage on the driver: resolve the run's spec, open its MLflow run, run the workers under Ray, conclude."""
    run_dir = run_dir_for(cfg)
    spec = resolve_run(cfg, data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_nodes_share(run_dir, cfg.cluster.storage_uri, tracking_uri(cfg.tracking, cfg.output_dir))
    tracker = open_run(cfg, spec, data_dir, tags)
    # Where the run's directory is node-local, a later stage on another machine logs to this MLflow run too.
    mirror_for(cfg).push_file(run_dir / RUN_ID_FILE)
    log.info(
        "training %s: %d workers (tp=%d, sp=%d), ZeRO-%d, %s, %d grad-accumulation steps, run dir %s",
        cfg.run_name, cfg.parallel.num_workers, cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel,
        cfg.parallel.zero_stage,
        spec.precision, spec.grad_accum_steps, run_dir,
    )
    launched = time.time()
    try:
        with PreemptionForwarder(run_dir, actor=actor_name(run_dir, spec.launch_id)) as forwarder:
            outcome = launch_ray(spec, RunLink(tracker.uri, tracker.run_id), run_dir,
                                 max_failures=cfg.train.max_failures,
                                 placement_strategy=str(cfg.cluster.placement_strategy),  # Ray's own str
                                 workers_per_node=cfg.cluster.workers_per_node,
                                 rejoin_timeout_s=cfg.cluster.rejoin_timeout_s)
    except BaseException:
        tracker.close("FAILED")
        raise
    conclude_run(cfg, spec, outcome, tracker, launched, forwarder.hand_over)
    return outcome


def conclude_run(cfg: PipelineConfig, spec: RunSpec, outcome: TrainOutcome, tracker: Tracker | None,
                 launched: float, hand_over: Callable[[], None] | None = None) -> None:
    """The end of a run for every launcher (the Ray driver, and every rank of `pipeline.launch`; `tracker` is
    rank 0's, None elsewhere): a failed run is marked FAILED and raises TrainingFailed (exit 2), a preempted one
    KILLED and raises Preempted (PREEMPTED_EXIT_CODE) after `hand_over` (e.g. submitit's requeue); a finished
    one records its start-up phases, checkpoint and loss curve (with the unigram baseline) and is FINISHED."""
    if outcome.failure:
        if tracker is not None:
            tracker.set_tags({"failure": outcome.failure[:5000]})
            tracker.close("FAILED")
        raise TrainingFailed(outcome.failure)
    if outcome.preempted:
        if tracker is not None:
            tracker.set_tags({"checkpoint": outcome.checkpoint})
            tracker.close("KILLED")
        if hand_over is not None:
            hand_over()
        raise Preempted(outcome)
    if tracker is None:
        return
    report_startup(outcome.timeline | {"process_start": process_start_time(), "launched": launched,
                                       "returned": time.time()}, tracker, outcome.final_step)
    data_dir = Path(spec.data_dir)
    finish_run(tracker, outcome, Path(spec.run_dir), cfg.run_name, unigram_baseline(cfg, data_dir, spec.model.vocab_size))


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
