"""The evaluate stage: validation loss, perplexity, bits per byte, a unigram baseline, samples and lm-eval tasks.

Each checkpoint is scored on an evaluation worker, a Ray task with the checkpoint's device: one GPU when
parallel.use_gpu (wherever the cluster has one; the run's files must be on shared storage there, as for
training), else one CPU slot of the driver's node using the node's cores (in this process when Ray is not
running and no cluster is configured: a lone `pipeline evaluate` or `generate` on a laptop). The driver logs what it returns to
the training run's MLflow run, at the step of the checkpoint it scored. `pipeline generate` samples there too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep.blend import component_splits, load_data_info, open_split
from data_prep.text_tokenizer import TextTokenizer, data_tokenizer
from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import (
    CheckpointError,
    checkpoint_root,
    complete_tags,
    is_complete,
    named_tag_dir,
    read_marker,
    require_latest,
)
from pipeline.config import EvalConfig, PipelineConfig, run_dir_for
from pipeline.data.validation import (
    LossTotals,
    sharded_validation_totals,
    train_token_counts,
    unigram_totals,
)
from pipeline.evaluation.downstream import run_lm_eval
from pipeline.evaluation.export import export
from pipeline.model.generation import generate_batch
from pipeline.model.gpt import GPT
from pipeline.model.size import model_for_data
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

VALIDATION_SPLIT = "validation"


def validation_totals(model, dataset, batch_size: int, max_tokens: int | None, byte_lengths: np.ndarray) -> LossTotals:
    """Summed next-token loss over the validation windows of the budget, in one process (the workers' sharded
    validation at data-parallel size 1)."""
    return sharded_validation_totals(model, dataset, batch_size, max_tokens, byte_lengths, next(model.parameters()).device)


def load_trained_model(model_cfg, tag_dir: Path, device: torch.device | None = None):
    model = GPT(model_cfg)
    # DeepSpeed's consolidation prints its progress; on a Ray worker that would reach the driver's stdout in the
    # middle of (or after) the samples a user reads there.
    with contextlib.redirect_stdout(sys.stderr):
        model.load_state_dict(consolidated_state_dict(tag_dir))
    model.eval()
    return model.to(device or torch.device("cpu"))


def evaluation_device() -> torch.device:
    """The device of the worker this runs on: its first GPU, else the CPU (then with all the node's cores)."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # Ray limits a 1-CPU task's threads to one
    return torch.device("cpu")


def on_evaluation_worker(cfg: PipelineConfig, fn, *args):
    """fn(*args) as a Ray task on the evaluation worker (module docstring), and its result. A CPU evaluation on
    a laptop whose Ray is not running yet (`pipeline generate`, `pipeline evaluate` on their own) runs in this
    process instead: the same cores, without starting Ray for it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.cluster.ray_runtime import ensure_ray

    if not (cfg.parallel.use_gpu or cfg.cluster.address or ray.is_initialized()):
        return fn(*args)
    ensure_ray(cfg.cluster)
    if cfg.parallel.use_gpu:
        options = {"num_gpus": 1, "num_cpus": 1}
    else:  # where the run's checkpoints and data are
        here = ray.get_runtime_context().get_node_id()
        options = {"num_cpus": 1, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    return ray.get(ray.remote(fn).options(**options).remote(*args))


def sample_texts(model, tokenizer: TextTokenizer, prompt: str, ev: EvalConfig, eos_id: int,
                 n_samples: int) -> list[str]:
    """n_samples continuations of prompt (prompt included), with the eval.* sampling settings, sampled together
    in one batch (generate_batch) seeded with eval.seed. The prompt starts as every training document did (a
    BOS where the tokenizer's convention adds one)."""
    if n_samples < 1:
        return []
    prompt_ids = [*tokenizer.specials.prefix, *tokenizer.encode(prompt)]
    (samples,) = generate_batch(model, [prompt_ids], ev.max_new_tokens, num_samples=n_samples,
                                temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p, eos_id=eos_id, seed=ev.seed)
    return [tokenizer.decode(prompt_ids + new) for new in samples]


def pull_to_this_node(cfg: PipelineConfig, data_dir: Path, tag_dir: Path) -> None:
    """On the evaluation worker, which may run on a node other than the driver's (a GPU node of a cluster without
    a shared file system): the data set and the checkpoint pulled from the run's mirror where this node lacks
    them (no-ops otherwise)."""
    from data_prep.dataset_store import pull_dataset
    from pipeline.checkpoint.store_sync import pull_checkpoint
    from pipeline.cluster.storage import mirror_for

    mirror = mirror_for(cfg)
    pull_dataset(mirror, data_dir)
    if mirror.covers(tag_dir):
        pull_checkpoint(mirror, tag_dir)


def _generate(cfg: PipelineConfig, data_dir: Path, tag_dir: Path, prompt: str) -> list[str]:
    pull_to_this_node(cfg, data_dir, tag_dir)
    manifest = load_data_info(data_dir)
    model = load_trained_model(model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id), tag_dir,
                               evaluation_device())
    return sample_texts(model, data_tokenizer(manifest), prompt, cfg.eval, manifest.eos_id,
                        max(1, cfg.eval.num_samples))


def generate_text(cfg: PipelineConfig, data_dir: Path, prompt: str) -> list[str]:
    """`pipeline generate`: samples from the run's latest checkpoint with the eval.* sampling settings, on the
    evaluation worker."""
    return on_evaluation_worker(cfg, _generate, cfg, data_dir, require_latest(run_dir_for(cfg)), prompt)


def checkpoints_to_evaluate(cfg: PipelineConfig) -> list[Path]:
    """The complete checkpoint tags eval.checkpoint names, oldest first: latest (the run's latest), all (every
    complete tag of the run), or one tag (its name, e.g. step_00000200, or its directory)."""
    run_dir = run_dir_for(cfg)
    which = cfg.eval.checkpoint
    if which == "latest":
        return [require_latest(run_dir)]
    root = checkpoint_root(run_dir)
    if which == "all":
        tags = complete_tags(root)
        if not tags:
            require_latest(run_dir)  # raises, saying how to get a checkpoint
        return [root / t for t in tags]
    tag_dir = named_tag_dir(root, which)
    if not is_complete(tag_dir):
        raise CheckpointError(
            f"eval.checkpoint={which}: {tag_dir} is not a complete checkpoint; choose latest, all, or one of "
            f"{', '.join(complete_tags(root)) or '(none: train the run first)'}."
        )
    return [tag_dir]


def evaluate(cfg: PipelineConfig, data_dir: Path) -> dict[str, float]:
    """Score the checkpoints eval.checkpoint names, each on the evaluation worker and logged to the run at its own
    step; the metrics of the last (the newest) are returned."""
    tags = checkpoints_to_evaluate(cfg)
    manifest = load_data_info(data_dir)
    vocab = model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id).vocab_size
    val = open_split(data_dir, VALIDATION_SPLIT)
    unigram = unigram_totals(train_token_counts(data_dir, vocab), val, cfg.eval.max_tokens,
                             padded_byte_lengths(data_tokenizer(manifest), vocab))
    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(cfg), cfg.run_name)
    results = []
    try:
        for tag_dir in tags:
            scored = on_evaluation_worker(cfg, score_checkpoint, cfg, data_dir, tag_dir)
            metrics = {**scored["metrics"], "unigram_val_loss": unigram.mean_loss,
                       "unigram_val_perplexity": unigram.perplexity}
            step = scored["step"]
            log.info("step %d: validation loss %.4f (perplexity %.2f, %.3f bits/byte) over %d tokens on %s; unigram "
                     "baseline %.4f", step, metrics["val_loss"], metrics["val_perplexity"],
                     metrics["val_bits_per_byte"], metrics["val_tokens"], scored["device"], unigram.mean_loss)
            if scored["text"]:
                print(scored["text"])
                tracker.log_text(scored["text"], f"samples/step_{step:08d}.txt")
            if scored["lm_eval"] is not None:
                tracker.log_text(json.dumps(scored["lm_eval"], indent=2), f"lm_eval/lm_eval_{tag_dir.name}.json")
            tracker.log(metrics, step=step)
            results.append({**metrics, "step": step})
        tracker.set_tags({"evaluated_checkpoint": str(tags[-1]),
                          "evaluation_worker": f"{scored['device']} (driver pid {os.getpid()})"})
    finally:
        tracker.close()
    return results[-1]


def padded_byte_lengths(tokenizer: TextTokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes per token id, zero for ids past the tokenizer's (a padded vocabulary)."""
    byte_lengths = tokenizer.byte_lengths()
    if len(byte_lengths) < vocab_size:
        byte_lengths = np.pad(byte_lengths, (0, vocab_size - len(byte_lengths)))
    return byte_lengths


def score_checkpoint(cfg: PipelineConfig, data_dir: Path, tag_dir: Path) -> dict:
    """On the evaluation worker: the checkpoint's validation metrics (and a blend's per data set), samples and
    lm-eval tasks. Returns {"step", "device", "metrics", "text", "lm_eval"} for the driver to log."""
    pull_to_this_node(cfg, data_dir, tag_dir)
    step = int(read_marker(tag_dir)["step"])
    manifest = load_data_info(data_dir)
    tokenizer = data_tokenizer(manifest)
    model_cfg = model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id)
    device = evaluation_device()
    model = load_trained_model(model_cfg, tag_dir, device)
    byte_lengths = padded_byte_lengths(tokenizer, model_cfg.vocab_size)
    totals = validation_totals(model, open_split(data_dir, VALIDATION_SPLIT), cfg.eval.batch_size,
                               cfg.eval.max_tokens, byte_lengths)
    metrics = {"val_loss": totals.mean_loss, "val_perplexity": totals.perplexity,
               "val_bits_per_byte": totals.bits_per_byte, "val_tokens": float(totals.tokens)}
    for name, part in component_splits(data_dir, VALIDATION_SPLIT):  # a blend's data sets, each on its own
        if len(part):
            part_totals = validation_totals(model, part, cfg.eval.batch_size, cfg.eval.max_tokens, byte_lengths)
            metrics[f"val_loss.{name}"] = part_totals.mean_loss
            metrics[f"val_bits_per_byte.{name}"] = part_totals.bits_per_byte
    samples = sample_texts(model, tokenizer, cfg.eval.prompt, cfg.eval, manifest.eos_id, cfg.eval.num_samples)
    text = "\n\n".join(f"--- sample {i} (step {step}) ---\n{s}" for i, s in enumerate(samples))
    downstream = None
    if cfg.eval.tasks:
        hf_dir = export(cfg, data_dir, tag_dir=tag_dir)
        downstream = run_lm_eval(hf_dir, cfg.eval.tasks, hf_dir.parent / f"lm_eval_{tag_dir.name}", cfg.eval.tasks_limit)
        for task, values in downstream.items():
            metrics.update({f"lm_eval.{task}.{name}": value for name, value in values.items()})
    return {"step": step, "device": f"{device} of pid {os.getpid()} on {socket.gethostname()}", "metrics": metrics,
            "text": text, "lm_eval": downstream}
