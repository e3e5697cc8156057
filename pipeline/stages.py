"""One function per stage; `run_pipeline` only chains them.

The heavy libraries (torch, Ray, DeepSpeed) are imported inside the stage functions: the CLI validates the
config first and fails on a bad override in about a second.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, run_dir_for
from pipeline.files import write_atomic

log = logging.getLogger(__name__)


def prepare_stage(cfg: PipelineConfig) -> Path:
    """The data set of cfg.data, prepared here, found prepared, or (with cluster.storage_uri) downloaded
    from the object store; a data set prepared here is uploaded there."""
    from data_prep.dataset_store import pull_dataset, push_dataset
    from data_prep.prepare import dataset_dir, prepare
    from pipeline.cluster.ray_runtime import ensure_ray
    from pipeline.cluster.storage import mirror_for

    mirror = mirror_for(cfg)
    target = dataset_dir(cfg.data)
    if pull_dataset(mirror, target):
        log.info("using the data set %s from %s", target.name, mirror.shown)
    ensure_ray(cfg.cluster)
    tracking = PrepareTracking(cfg, target)
    try:
        out = prepare(cfg.data, tracking, mirror=mirror)  # a no-op when complete
    except BaseException:
        tracking.close("FAILED")
        raise
    tracking.close("FINISHED")
    push_dataset(mirror, out)
    return out


class PrepareTracking:
    """The MLflow run of a prepare that does work, opened at its first progress report (a data set found
    prepared logs nothing): bytes read, documents, tokens, tokens/s and the time left every few seconds, then the
    totals; a mixture's sources under their names (`notes.tokens_per_s`). The runs go to the experiment
    `<tracking.experiment>-prepare`, beside (not among) the training runs. A killed prepare's run is re-opened by
    the resumed one (its id is kept under output_dir/.prepare_runs/)."""

    def __init__(self, cfg: PipelineConfig, target: Path):
        self.cfg, self.target, self.tracker = cfg, target, None

    def __call__(self, label: str, metrics: dict[str, float], step: int) -> None:
        import dataclasses

        from pipeline.config import flatten
        from pipeline.tracking import Tracker

        try:
            if self.tracker is None:
                tracking = dataclasses.replace(self.cfg.tracking, experiment=f"{self.cfg.tracking.experiment}-prepare")
                self.tracker = Tracker.open(tracking, self.cfg.output_dir,
                                            Path(self.cfg.output_dir) / ".prepare_runs" / self.target.name,
                                            f"prepare-{self.target.name}",
                                            tags={"stage": "prepare", "data_dir": str(self.target)})
                self.tracker.log_params(flatten(self.cfg.data, "data."))
            prefix = f"{label}." if label else ""
            self.tracker.log({prefix + key: float(value) for key, value in metrics.items()}, step=step)
        except Exception as err:  # the tracking store is down: the logs still say it all, prepare goes on
            log.warning("could not log prepare's progress to MLflow: %s", err)

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.close(status)
            log.info("prepare logged to MLflow run %s", self.tracker.run_id)


def pull_run(cfg: PipelineConfig) -> Path:
    """What the stages that read a trained run need, pulled from the run's mirror where this machine lacks it
    (nothing to do without cluster.storage_uri): the data set, the checkpoints eval.checkpoint names and the
    run's MLflow run id (so that they log to the training's run). Returns the data set directory."""
    from data_prep.dataset_store import pull_dataset
    from data_prep.prepare import dataset_dir
    from pipeline.checkpoint.store_sync import pull_checkpoints
    from pipeline.cluster.storage import mirror_for
    from pipeline.tracking import RUN_ID_FILE

    data_dir, mirror, run_dir = dataset_dir(cfg.data), mirror_for(cfg), run_dir_for(cfg)
    pull_dataset(mirror, data_dir)
    pull_checkpoints(mirror, run_dir, cfg.eval.checkpoint)
    if mirror.active and not (run_dir / RUN_ID_FILE).exists():
        run_id = (mirror.read_text(run_dir / RUN_ID_FILE) or "").strip()
        if re.fullmatch(r"[0-9a-f]{32}", run_id):
            write_atomic(run_dir / RUN_ID_FILE, run_id)
        elif run_id:
            log.warning("%s holds %r, not an MLflow run id: ignored (this stage opens a run of its own)",
                        mirror.shown_path(run_dir / RUN_ID_FILE), run_id[:64])
    return data_dir


def train_stage(cfg: PipelineConfig):
    """Prepare the data if needed (a no-op when its shards are complete), then train."""
    from data_prep.dataset_dirs import tokenizer_vocab_size
    from pipeline.train.memory_plan import planned_model
    from pipeline.train.run_spec import resolve_layout

    # Fail before any work (and before Ray and the driver's imports) on what the layout refuses; the driver
    # resolves it again with the prepared data set's own vocabulary.
    resolve_layout(cfg, planned_model(cfg.model, tokenizer_vocab_size(cfg.data)))
    data_dir = prepare_stage(cfg)
    from pipeline.train.driver import train

    return train(cfg, data_dir)


def plan_stage(cfg: PipelineConfig, gpu: str | None = None, gpu_memory: str | None = None,
               peak_tflops: float | None = None, mfu: float = 0.4, tokens: float | None = None) -> bool:
    """`pipeline plan`: print memory per rank, a verdict against the device and the time to the token budget
    (default: train.max_steps steps). Returns whether the layout fits. Without --gpu or --gpu-memory the device is
    what `pipeline train` checks against (pipeline.train.memory_plan.device_memory: on CPU, this host's RAM per rank)."""
    from data_prep.dataset_dirs import tokenizer_vocab_size
    from pipeline.train.ds_config import resolve_precision
    from pipeline.train.memory_plan import device_memory, gpu_spec, parse_memory, planned_model, report

    memory, peak = device_memory(cfg.parallel, cfg.cluster.workers_per_node), peak_tflops or cfg.train.peak_tflops
    device_bytes, source = (memory.nbytes, memory.source) if memory else (None, "")
    if gpu:
        (device_bytes, gpu_peak), source = gpu_spec(gpu), f"--gpu {gpu}"
        peak = peak or gpu_peak
    if gpu_memory:
        device_bytes, source = parse_memory(gpu_memory), f"--gpu-memory {gpu_memory}"
    precision = cfg.parallel.precision
    if precision == "auto":  # as the cluster would resolve it: GPUs train in bf16, a CPU as this one does
        precision = "bf16" if cfg.parallel.use_gpu or gpu else resolve_precision(cfg.parallel)
    model = planned_model(cfg.model, tokenizer_vocab_size(cfg.data))
    text, fits = report(model, cfg.parallel, cfg.train, precision, device_bytes, peak, mfu,
                        tokens or cfg.train.max_steps * cfg.train.global_batch_tokens, source)
    print(text)
    return fits


def evaluate_stage(cfg: PipelineConfig) -> dict[str, float]:
    from data_prep.prepare import is_complete
    from pipeline.evaluation.evaluate import evaluate

    data_dir = pull_run(cfg)
    if not is_complete(data_dir):
        raise ConfigError(
            f"no prepared data set at {data_dir}: run `pipeline prepare` (or `pipeline run`) with the same "
            f"data overrides first."
        )
    return evaluate(cfg, data_dir)


def generate_stage(cfg: PipelineConfig) -> list[str]:
    """Sample from the trained run (the prompt comes from the command line or eval.prompt)."""
    from pipeline.evaluation.evaluate import generate_text

    texts = generate_text(cfg, pull_run(cfg), cfg.eval.prompt)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    return texts


def export_stage(cfg: PipelineConfig) -> Path:
    """The run's latest checkpoint as a Hugging Face transformers directory."""
    from pipeline.cluster.storage import mirror_for
    from pipeline.evaluation.export import export

    out = export(cfg, pull_run(cfg), Path(cfg.eval.export_dir) if cfg.eval.export_dir else None)
    print(f"Exported to {out}: load it with transformers' AutoModelForCausalLM.from_pretrained('{out}') "
          f"and AutoTokenizer.from_pretrained('{out}').")
    mirror = mirror_for(cfg)
    if mirror.active and mirror.covers(out):  # this machine's disk may be its own: the store keeps it
        mirror.push(out)
        print(f"Uploaded to {mirror.shown_path(out)}")
    return out


def run_pipeline(cfg: PipelineConfig) -> dict[str, float]:
    from pipeline.redaction import redact_uri
    from pipeline.tracking import RUN_ID_FILE, run_page, tracking_uri, ui_command

    train_stage(cfg)
    metrics = evaluate_stage(cfg)
    uri = tracking_uri(cfg.tracking, cfg.output_dir)
    print()
    print(f"Done: validation loss {metrics['val_loss']:.4f} (perplexity {metrics['val_perplexity']:.1f}); "
          f"unigram baseline {metrics['unigram_val_loss']:.4f}.")
    print(f"MLflow results: experiment '{cfg.tracking.experiment}', run '{cfg.run_name}', store {redact_uri(uri)}")
    run_id = (run_dir_for(cfg) / RUN_ID_FILE).read_text().strip()
    print(f"Open them with:  {ui_command(uri)}")
    print(f"then browse the run: {run_page(uri, run_id)}")
    return metrics
