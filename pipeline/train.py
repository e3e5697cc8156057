"""The train stage on the driver: resolve the job, open the MLflow run, launch workers with Ray Train."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
import uuid
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


# Train settings that do not change the numbers a run computes.
_NOT_MATH = ("log_interval_steps", "save_interval_steps", "keep_last_checkpoints", "resume", "eval_interval_steps",
             "eval_batches", "peak_tflops", "allow_config_change", "max_failures", "compile")


def math_config(cfg: PipelineConfig, model: ModelConfig, data_dir: Path, precision: str, tokenizer_sha256: str) -> dict:
    """What changes the numbers a run computes (not logging, not where it saves). The run's length counts
    too unless the schedule is constant: cosine and WSD stretch over train.max_steps, so a longer run has
    another learning rate at every step after warm-up."""
    not_math = _NOT_MATH + (("max_steps",) if cfg.train.schedule == "constant" else ())
    train = {k: v for k, v in asdict(cfg.train).items() if k not in not_math}
    return {"model": asdict(model), "train": train, "data": data_dir.name, "precision": precision,
            "tokenizer_sha256": tokenizer_sha256}


def check_resume(cfg: PipelineConfig, job: TrainJob) -> TrainJob:
    """Resolve train.resume on the driver and refuse a checkpoint trained with different math."""
    from pipeline.checkpointing import (
        check_pickles,
        checkpoint_root,
        config_differences,
        needs_universal,
        resolve_resume,
        to_universal,
        verify_checkpoint,
        zero_stage_change_supported,
    )
    from pipeline.storage import (
        pull_latest_checkpoint,
        push_checkpoint_files,
        push_checkpoint_marker,
        store_for,
    )

    store = store_for(cfg.cluster.storage_uri)
    if store is not None and cfg.train.resume == "auto":
        pull_latest_checkpoint(store, run_dir_for(cfg))  # a job on a fresh node resumes from the store
    tag_dir = resolve_resume(cfg.train.resume, checkpoint_root(run_dir_for(cfg)))
    if tag_dir is None:
        return job
    marker = verify_checkpoint(tag_dir)  # a missing or truncated file is named here, before workers start
    check_pickles(tag_dir)  # and a file that would run code when DeepSpeed unpickles it is refused
    saved = marker.get("client_state", {}).get("math_config")
    differences = config_differences(saved, job.math_config) if saved is not None else []
    if differences and not cfg.train.allow_config_change:
        raise ConfigError(
            f"the checkpoint {tag_dir} was trained with a different config:\n  " + "\n  ".join(differences)
            + "\nresume with the same values, start a new run (run_name=... or train.resume=none), or pass "
            "train.allow_config_change=true to resume anyway."
        )
    if differences:
        log.warning("resuming %s despite config changes: %s", tag_dir, "; ".join(differences))
    parallel = cfg.parallel
    saved_stage = marker.get("zero_stage", 0)
    if not zero_stage_change_supported(saved_stage, parallel.zero_stage):
        raise ConfigError(
            f"the checkpoint {tag_dir} was saved at ZeRO stage {saved_stage}, and DeepSpeed cannot resume it at "
            f"parallel.zero_stage={parallel.zero_stage} (only stages 1 and 2 convert into each other): resume with "
            f"parallel.zero_stage={saved_stage} (any data-parallel size and tensor-parallel degree work), or start "
            f"a new run (run_name=... or train.resume=none)."
        )
    if needs_universal(marker, parallel.num_workers, parallel.tensor_parallel, parallel.zero_stage):
        # Elastic resume: another data-parallel size or ZeRO stage than the checkpoint was saved with.
        universal = to_universal(tag_dir)
        if store is not None and universal.is_relative_to(run_dir_for(cfg)):  # for the workers of other nodes
            push_checkpoint_files(store, run_dir_for(cfg), universal)
            push_checkpoint_marker(store, run_dir_for(cfg), universal, latest=False)
        ds_config = {**job.ds_config, "checkpoint": {"load_universal": True}}
        log.info("resuming %s (saved at world size %d, ZeRO-%d) at world size %d, ZeRO-%d through %s",
                 tag_dir, marker["world_size"], marker.get("zero_stage", 0), parallel.num_workers,
                 parallel.zero_stage, universal)
        return dataclasses.replace(job, resume_from=str(universal), ds_config=ds_config)
    explicit = cfg.train.resume not in ("auto", "none")
    return dataclasses.replace(job, resume_from=str(tag_dir) if explicit else None)


def build_job(cfg: PipelineConfig, data_dir: Path, tracking_uri: str | None, run_id: str | None) -> TrainJob:
    from data_prep.shards import check_dataset_checksums, load_manifest
    from pipeline.ds_config import make_ds_config, resolve_precision
    from pipeline.model_size import training_flops_per_token

    manifest = load_manifest(data_dir)
    if cfg.data.verify_checksums:
        t0 = time.time()
        hashed = check_dataset_checksums(data_dir)
        if hashed:
            log.info("verified the sha256 of %d files of %s in %.1fs", hashed, data_dir, time.time() - t0)
    if manifest.window_length != cfg.model.context_length + 1:
        raise ConfigError(
            f"the data set {data_dir} holds windows of {manifest.window_length} tokens but the model needs "
            f"model.context_length + 1 = {cfg.model.context_length + 1}: prepare the data with the same "
            f"context_length."
        )
    model = model_for_data(cfg.model, manifest.vocab_size)
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
        ds_config=make_ds_config(cfg.train, cfg.parallel, precision, accum),
        flops_per_token=training_flops_per_token(model),
        config_fingerprint=fingerprint(math),
        math_config=math,
        tokenizer_sha256=manifest.tokenizer_sha256,
        job_id=uuid.uuid4().hex,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
    )


OUTCOME_FILE = "train_outcome.json"


def _ray_worker(config: dict) -> None:
    import ray
    import torch.distributed as dist

    from data_prep.shards import write_atomic
    from pipeline.train_loop import train_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    job: TrainJob = config["job"]
    outcome = train_worker(job)
    # Which Ray node each rank ran on, for the record (placement across nodes shows here).
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    outcome = dataclasses.replace(outcome, worker_nodes=nodes)
    # Ray Train only hands metrics back with a Ray checkpoint; our checkpoints are DeepSpeed's, so rank 0
    # leaves its outcome in the run directory for the driver.
    if dist.get_rank() == 0:
        write_atomic(Path(job.run_dir) / OUTCOME_FILE, json.dumps(asdict(outcome)))


def worker_resources(parallel) -> dict[str, float]:
    resources = {"CPU": float(parallel.cpus_per_worker)}
    if parallel.use_gpu:
        resources["GPU"] = float(parallel.gpus_per_worker)
    return resources


def workers_on_nodes(parallel, workers_per_node: int) -> list[dict[str, str]]:
    """One Ray label selector per worker that puts exactly workers_per_node of them on each of the first
    num_workers / workers_per_node alive nodes with room for them (by node id, head first)."""
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    need = {k: v * workers_per_node for k, v in worker_resources(parallel).items()}
    nodes = [n for n in ray.nodes() if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in need.items())]
    nodes.sort(key=lambda n: (not n["Resources"].get("node:__internal_head__"), n["NodeID"]))
    n_nodes = parallel.num_workers // workers_per_node
    if len(nodes) < n_nodes:
        raise ConfigError(
            f"cluster.workers_per_node={workers_per_node} with parallel.num_workers={parallel.num_workers} needs "
            f"{n_nodes} nodes with {need} each, but the Ray cluster has {len(nodes)} such nodes: add nodes, or "
            f"lower parallel.num_workers or the resources per worker."
        )
    return [{NODE_ID_LABEL_KEY: nodes[i // workers_per_node]["NodeID"]} for i in range(parallel.num_workers)]


def launch_ray(job: TrainJob, run_dir: Path, max_failures: int = 0, placement_strategy: str = "PACK",
               workers_per_node: int | None = None) -> TrainOutcome:
    """Run train_worker on parallel.num_workers Ray Train workers and return rank 0's outcome."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    parallel = job.parallel
    placement = {} if workers_per_node is None else {"label_selector": workers_on_nodes(parallel, workers_per_node)}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=parallel.num_workers,
            use_gpu=parallel.use_gpu,
            resources_per_worker=worker_resources(parallel),
            placement_strategy=placement_strategy,
            **placement,
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


class PreemptionForwarder:
    """While Ray workers train, SIGTERM/SIGUSR1 to this driver (Slurm, Kubernetes) become a PREEMPT file in
    the run directory, which every worker checks at each step boundary.

    A Python handler of SIGUSR1 that was installed before (submitit's, which requeues a Hydra sweep point as a
    new Slurm job when the time limit nears) is not lost: `hand_over()`, called once the workers saved their
    checkpoint, passes it the signal. SIGTERM is not handed over: the handler before ours is Ray's, which
    would end the driver with code 15 instead of 75 (what the sbatch script requeues on)."""

    def __init__(self, run_dir: Path):
        from pipeline.train_loop import PREEMPT_FILE

        self.flag = run_dir / PREEMPT_FILE
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: asking the workers to checkpoint and stop", signum)
        self.received = signum
        self.flag.touch()

    def __enter__(self) -> PreemptionForwarder:
        self.flag.unlink(missing_ok=True)  # a leftover from an earlier preemption must not stop this run
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.flag.unlink(missing_ok=True)

    def hand_over(self) -> None:
        """Call the SIGUSR1 handler that was there before, if the signal received was SIGUSR1 and the handler
        a Python function."""
        previous = self.previous.get(signal.SIGUSR1) if self.received == signal.SIGUSR1 else None
        if callable(previous):
            log.warning("checkpoint saved; passing signal %d on to the handler installed before (%s)",
                        self.received, getattr(previous, "__qualname__", previous))
            previous(self.received, None)


def open_run(cfg: PipelineConfig, job: TrainJob, data_dir: Path, tags: dict[str, str] | None = None):
    """Open (or re-open) the MLflow run of this training job and record what defines it."""
    from pipeline.tracking import Tracker

    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(cfg), cfg.run_name, tags=tags)
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
    try:
        with PreemptionForwarder(run_dir) as forwarder:
            outcome = launch_ray(job, run_dir, max_failures=cfg.train.max_failures,
                                 placement_strategy=cfg.cluster.placement_strategy,
                                 workers_per_node=cfg.cluster.workers_per_node)
    except BaseException:
        tracker.close("FAILED")
        raise
    if outcome.preempted:
        tracker.set_tags({"checkpoint": outcome.checkpoint})
        tracker.close("KILLED")
        forwarder.hand_over()  # e.g. submitit requeues the job here (and exits)
        raise Preempted(outcome)
    finish_run(tracker, outcome, run_dir, cfg.run_name)
    return outcome


class Preempted(SystemExit):
    """Training saved a checkpoint and stopped on request; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, outcome: TrainOutcome):
        from pipeline.train_loop import PREEMPTED_EXIT_CODE

        log.warning("training was preempted at step %d; checkpoint %s; resume with the same command",
                    outcome.final_step, outcome.checkpoint)
        super().__init__(PREEMPTED_EXIT_CODE)


def finish_run(tracker, outcome: TrainOutcome, run_dir: Path, run_name: str) -> None:
    """Record the checkpoint and the loss curve, and mark the MLflow run finished."""
    from pipeline.plots import plot_loss_curve

    tracker.set_tags({"checkpoint": outcome.checkpoint})
    if outcome.worker_nodes:
        tracker.set_tags({"ray_worker_nodes": ",".join(outcome.worker_nodes)})
    history = tracker.client.get_metric_history(tracker.run_id, "train_loss")
    if history:
        points = sorted((m.step, m.value) for m in history)
        path = plot_loss_curve([s for s, _ in points], [v for _, v in points], run_dir / "loss_curve.png", run_name)
        tracker.log_artifact(path, "plots")
    tracker.close()
    log.info("training finished at step %d; checkpoint %s", outcome.final_step, outcome.checkpoint)
