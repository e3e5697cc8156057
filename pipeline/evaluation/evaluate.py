"""The evaluate stage: validation loss, perplexity, bits per byte, a unigram baseline, and samples.

Everything is logged to the training run's MLflow run, at the step of the checkpoint it scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from data_prep.blend import component_splits, load_data_info, open_split
from data_prep.tokenizer import load_tokenizer
from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import (
    CheckpointError,
    checkpoint_root,
    complete_tags,
    is_complete,
    read_marker,
    require_latest,
)
from pipeline.config import EvalConfig, PipelineConfig, run_dir_for
from pipeline.data.validation import (
    LossTotals,
    sharded_validation_totals,
    token_byte_lengths,
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


def load_trained_model(model_cfg, tag_dir: Path):
    model = GPT(model_cfg)
    model.load_state_dict(consolidated_state_dict(tag_dir))
    model.eval()
    return model


def sample_texts(model, sp, prompt: str, ev: EvalConfig, eos_id: int, n_samples: int) -> list[str]:
    """n_samples continuations of prompt (prompt included), with the eval.* sampling settings, sampled together
    in one batch (generate_batch) seeded with eval.seed."""
    if n_samples < 1:
        return []
    prompt_ids = sp.encode(prompt)
    (samples,) = generate_batch(model, [prompt_ids], ev.max_new_tokens, num_samples=n_samples,
                                temperature=ev.temperature, top_k=ev.top_k, top_p=ev.top_p, eos_id=eos_id, seed=ev.seed)
    return [sp.decode(prompt_ids + new) for new in samples]


def generate_text(cfg: PipelineConfig, data_dir: Path, prompt: str) -> list[str]:
    """`pipeline generate`: samples from the run's latest checkpoint with the eval.* sampling settings."""
    tag_dir = require_latest(run_dir_for(cfg))
    manifest = load_data_info(data_dir)
    model = load_trained_model(model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id), tag_dir)
    return sample_texts(model, load_tokenizer(manifest.tokenizer_path), prompt, cfg.eval, manifest.eos_id,
                        max(1, cfg.eval.num_samples))


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
    tag_dir = Path(which) if Path(which).is_absolute() or "/" in which else root / which
    if not is_complete(tag_dir):
        raise CheckpointError(
            f"eval.checkpoint={which}: {tag_dir} is not a complete checkpoint; choose latest, all, or one of "
            f"{', '.join(complete_tags(root)) or '(none: train the run first)'}."
        )
    return [tag_dir]


def evaluate(cfg: PipelineConfig, data_dir: Path) -> dict[str, float]:
    """Score the checkpoints eval.checkpoint names, each logged to the run at its own step; the metrics of the
    last (the newest) are returned."""
    tags = checkpoints_to_evaluate(cfg)
    manifest = load_data_info(data_dir)
    sp = load_tokenizer(manifest.tokenizer_path)
    model_cfg = model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    val = open_split(data_dir, VALIDATION_SPLIT)
    byte_lengths = token_byte_lengths(sp)
    if len(byte_lengths) < model_cfg.vocab_size:
        byte_lengths = np.pad(byte_lengths, (0, model_cfg.vocab_size - len(byte_lengths)))
    unigram = unigram_totals(train_token_counts(data_dir, model_cfg.vocab_size), val, cfg.eval.max_tokens, byte_lengths)
    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir_for(cfg), cfg.run_name)
    try:
        results = [evaluate_checkpoint(cfg, data_dir, tag_dir, model_cfg, sp, val, byte_lengths, unigram, tracker)
                   for tag_dir in tags]
        tracker.set_tags({"evaluated_checkpoint": str(tags[-1])})
    finally:
        tracker.close()
    return results[-1]


def evaluate_checkpoint(cfg: PipelineConfig, data_dir: Path, tag_dir: Path, model_cfg, sp, val, byte_lengths,
                        unigram: LossTotals, tracker) -> dict[str, float]:
    step = int(read_marker(tag_dir)["step"])
    manifest = load_data_info(data_dir)
    model = load_trained_model(model_cfg, tag_dir)
    totals = validation_totals(model, val, cfg.eval.batch_size, cfg.eval.max_tokens, byte_lengths)
    metrics = {
        "val_loss": totals.mean_loss,
        "val_perplexity": totals.perplexity,
        "val_bits_per_byte": totals.bits_per_byte,
        "val_tokens": float(totals.tokens),
        "unigram_val_loss": unigram.mean_loss,
        "unigram_val_perplexity": unigram.perplexity,
    }
    for name, part in component_splits(data_dir, VALIDATION_SPLIT):  # a blend's data sets, each on its own
        if len(part):
            part_totals = validation_totals(model, part, cfg.eval.batch_size, cfg.eval.max_tokens, byte_lengths)
            metrics[f"val_loss.{name}"] = part_totals.mean_loss
            metrics[f"val_bits_per_byte.{name}"] = part_totals.bits_per_byte
    log.info(
        "step %d: validation loss %.4f (perplexity %.2f, %.3f bits/byte) over %d tokens; unigram baseline %.4f",
        step, totals.mean_loss, totals.perplexity, totals.bits_per_byte, totals.tokens, unigram.mean_loss,
    )

    samples = sample_texts(model, sp, cfg.eval.prompt, cfg.eval, manifest.eos_id, cfg.eval.num_samples)
    text = "\n\n".join(f"--- sample {i} (step {step}) ---\n{s}" for i, s in enumerate(samples))
    print(text)

    if cfg.eval.tasks:
        hf_dir = export(cfg, data_dir, tag_dir=tag_dir)
        downstream = run_lm_eval(hf_dir, cfg.eval.tasks, hf_dir.parent / f"lm_eval_{tag_dir.name}", cfg.eval.tasks_limit)
        for task, values in downstream.items():
            metrics.update({f"lm_eval.{task}.{name}": value for name, value in values.items()})
            log.info("lm-eval %s: %s", task, values)
        tracker.log_artifact(hf_dir.parent / f"lm_eval_{tag_dir.name}" / "lm_eval_results.json", "lm_eval")
    tracker.log(metrics, step=step)
    if text:
        tracker.log_text(text, f"samples/step_{step:08d}.txt")
    return {**metrics, "step": step}
