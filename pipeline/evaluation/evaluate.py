"""The evaluate stage: validation loss, perplexity, bits per byte, a unigram baseline, and samples.

Everything is logged to the training run's MLflow run, at the step of the checkpoint it scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.blend import component_dirs, component_splits, is_blend, load_data_info, open_split
from data_prep.shards import WindowDataset, load_manifest
from data_prep.tokenizer import load_tokenizer
from pipeline.checkpoint.consolidate import consolidated_state_dict
from pipeline.checkpoint.layout import read_marker, require_latest
from pipeline.config import EvalConfig, PipelineConfig, run_dir_for
from pipeline.data.loader import window_batches
from pipeline.evaluation.downstream import run_lm_eval
from pipeline.evaluation.export import export
from pipeline.model.generation import generate
from pipeline.model.gpt import GPT
from pipeline.model.size import model_for_data
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

VALIDATION_SPLIT = "validation"


@dataclass
class LossTotals:
    nats: float
    tokens: int
    bytes: int

    @property
    def mean_loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(1, self.bytes)


def token_byte_lengths(sp) -> np.ndarray:
    """UTF-8 bytes each token stands for (byte-fallback pieces are one byte; control tokens none)."""
    lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return lengths


@torch.no_grad()
def validation_totals(model, dataset, batch_size: int, max_tokens: int | None, byte_lengths: np.ndarray) -> LossTotals:
    """Summed next-token loss over the validation windows; `model(inputs)` returns (logits, _)."""
    nats, tokens, nbytes = 0.0, 0, 0
    lengths = torch.from_numpy(byte_lengths)
    for inputs, targets in window_batches(dataset, batch_size, max_tokens):
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        nats += loss.item()
        tokens += targets.numel()
        nbytes += int(lengths[targets].sum())
    return LossTotals(nats, tokens, nbytes)


def unigram_totals(train_counts: np.ndarray, dataset, max_tokens: int | None, byte_lengths: np.ndarray) -> LossTotals:
    """Loss of a unigram model (add-one smoothed training-token frequencies) on the same validation targets:
    the baseline a model that learned nothing about context would reach."""
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + len(train_counts))
    nats, tokens, nbytes = 0.0, 0, 0
    for _, targets in window_batches(dataset, 256, max_tokens):
        t = targets.numpy().reshape(-1)
        nats -= float(log_probs[t].sum())
        tokens += t.size
        nbytes += int(byte_lengths[t].sum())
    return LossTotals(nats, tokens, nbytes)


def token_counts(dataset, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(dataset), 4096):
        windows = dataset.windows(np.arange(start, min(len(dataset), start + 4096)))
        counts += np.bincount(windows[:, 1:].reshape(-1), minlength=vocab_size)[:vocab_size]
    return counts


def train_token_counts(data_dir: Path, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the training split: counted by prepare (manifest.token_counts), or, for
    a data set prepared before it counted them, by reading the split's windows. A blend's: its data sets'
    counts summed (the unigram of its validation windows, which hold every data set in its own proportion)."""
    if is_blend(data_dir):
        return sum(train_token_counts(d, vocab_size) for d in component_dirs(data_dir))
    manifest = load_manifest(data_dir)
    if not manifest.token_counts:
        return token_counts(WindowDataset(data_dir, "train"), vocab_size)
    counts = np.load(Path(data_dir) / manifest.token_counts["file"])
    return np.pad(counts, (0, max(0, vocab_size - len(counts))))[:vocab_size]


def load_trained_model(model_cfg, tag_dir: Path):
    model = GPT(model_cfg)
    model.load_state_dict(consolidated_state_dict(tag_dir))
    model.eval()
    return model


def sample_texts(model, sp, prompt: str, ev: EvalConfig, eos_id: int, n_samples: int) -> list[str]:
    """n_samples continuations of prompt (prompt included), with the eval.* sampling settings; sample i draws
    with seed eval.seed + i."""
    prompt_ids = sp.encode(prompt)
    texts = []
    for i in range(n_samples):
        new = generate(model, prompt_ids, ev.max_new_tokens, temperature=ev.temperature, top_k=ev.top_k,
                       top_p=ev.top_p, eos_id=eos_id, seed=ev.seed + i)
        texts.append(sp.decode(prompt_ids + new))
    return texts


def generate_text(cfg: PipelineConfig, data_dir: Path, prompt: str) -> list[str]:
    """`pipeline generate`: samples from the run's latest checkpoint with the eval.* sampling settings."""
    tag_dir = require_latest(run_dir_for(cfg))
    manifest = load_data_info(data_dir)
    model = load_trained_model(model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id), tag_dir)
    return sample_texts(model, load_tokenizer(manifest.tokenizer_path), prompt, cfg.eval, manifest.eos_id,
                        max(1, cfg.eval.num_samples))


def evaluate(cfg: PipelineConfig, data_dir: Path) -> dict[str, float]:
    run_dir = run_dir_for(cfg)
    tag_dir = require_latest(run_dir)
    step = int(read_marker(tag_dir)["step"])
    manifest = load_data_info(data_dir)
    sp = load_tokenizer(manifest.tokenizer_path)
    model_cfg = model_for_data(cfg.model, manifest.vocab_size, manifest.eos_id)
    model = load_trained_model(model_cfg, tag_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    val = open_split(data_dir, VALIDATION_SPLIT)
    byte_lengths = token_byte_lengths(sp)
    if len(byte_lengths) < model_cfg.vocab_size:
        byte_lengths = np.pad(byte_lengths, (0, model_cfg.vocab_size - len(byte_lengths)))
    totals = validation_totals(model, val, cfg.eval.batch_size, cfg.eval.max_tokens, byte_lengths)
    counts = train_token_counts(data_dir, model_cfg.vocab_size)
    unigram = unigram_totals(counts, val, cfg.eval.max_tokens, byte_lengths)
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

    tracker = Tracker.open(cfg.tracking, cfg.output_dir, run_dir, cfg.run_name)
    if cfg.eval.tasks:
        hf_dir = export(cfg, data_dir)
        downstream = run_lm_eval(hf_dir, cfg.eval.tasks, hf_dir.parent / f"lm_eval_{tag_dir.name}", cfg.eval.tasks_limit)
        for task, values in downstream.items():
            metrics.update({f"lm_eval.{task}.{name}": value for name, value in values.items()})
            log.info("lm-eval %s: %s", task, values)
        tracker.log_artifact(hf_dir.parent / f"lm_eval_{tag_dir.name}" / "lm_eval_results.json", "lm_eval")
    tracker.log(metrics, step=step)
    if text:
        tracker.log_text(text, f"samples/step_{step:08d}.txt")
    tracker.set_tags({"evaluated_checkpoint": str(tag_dir)})
    tracker.close()
    return {**metrics, "step": step}
