"""Validation on the training workers (pipeline.data.validation) in real multi-process DeepSpeed runs on CPU:
each data-parallel rank scores its slice of the validation windows with the training layout and the sums are
reduced exactly, so the loss at every layout (1 or 2 data-parallel ranks, tensor parallelism 2, ZeRO-3, sequence
parallelism 2: each rank of the group scores the targets of its slice of the windows) equals
the one-process evaluation of the same weights, and the layouts agree with each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.config import ModelConfig, ParallelConfig, TrainConfig
from pipeline.data.validation import rank_slices
from pipeline.train.ds_config import make_ds_config

STEPS = 4
MODEL = ModelConfig(vocab_size=400, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64)


def test_rank_slices_cover_every_window_once_with_the_same_number_of_batches():
    for n, dp, micro in [(37, 2, 4), (5, 4, 2), (3, 4, 1), (16, 1, 16)]:
        slices = [rank_slices(n, dp, r, micro) for r in range(dp)]
        assert len({len(s) for s in slices}) == 1
        seen = np.concatenate([np.concatenate(s) for s in slices])
        assert sorted(seen[seen >= 0].tolist()) == list(range(n))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset
    from data_prep.sources import shakespeare_documents
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import TokenizerConfig

    root = tmp_path_factory.mktemp("sharded")
    tokenizer = train_tokenizer(list(shakespeare_documents())[:40], TokenizerConfig(vocab_size=400), root / "t.model", seed=0)
    rng = np.random.default_rng(0)
    starts, steps = rng.integers(0, 400, size=(293, 1)), rng.integers(1, 4, size=(293, 1))
    windows = (starts + steps * np.arange(17)[None, :]) % 400
    # 37 validation windows: 2 ranks x micro-batch 4 leave a short, padded last batch.
    return write_synthetic_dataset(root / "data", windows, vocab_size=400, val_windows=37, tokenizer=tokenizer)


def make_spec(data_dir, run_dir, *, workers=1, tp=1, sp=1, zero=0, micro=4):
    from pipeline.train.run_spec import RunSpec

    train = TrainConfig(max_steps=STEPS, micro_batch_size=micro, warmup_steps=1, lr=1e-2, resume="none",
                        global_batch_tokens=8 * 16, log_interval_steps=1, peak_tflops=1.0, eval_interval_steps=2)
    parallel = ParallelConfig(num_workers=workers, tensor_parallel=tp, sequence_parallel=sp, zero_stage=zero,
                              precision="fp32")
    accum = 8 // (micro * (workers // (tp * sp)))
    return RunSpec(
        model=MODEL, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir), precision="fp32",
        grad_accum_steps=accum, ds_config=make_ds_config(train, parallel, "fp32", accum, d_model=MODEL.d_model),
        flops_per_token=1.0, config_fingerprint="test", math_config={}, tokenizer_sha256="",
    )


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


def one_process_validation(spec):
    """pipeline evaluate's computation on the run's final checkpoint: one process, the whole model."""
    from pathlib import Path

    from data_prep.blend import open_split
    from data_prep.shards import load_manifest
    from data_prep.text_tokenizer import data_tokenizer
    from pipeline.checkpoint.layout import checkpoint_root, latest_complete
    from pipeline.evaluation.evaluate import load_trained_model, validation_totals

    model = load_trained_model(MODEL, latest_complete(checkpoint_root(Path(spec.run_dir))))
    lengths = data_tokenizer(load_manifest(Path(spec.data_dir))).byte_lengths()
    return validation_totals(model, open_split(Path(spec.data_dir), "validation"), 16, None, lengths).mean_loss


val_losses: dict[str, dict[int, float]] = {}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(), dict(workers=2, zero=1), dict(workers=2, tp=2), dict(workers=2, zero=3),
                                    dict(workers=2, sp=2)],
                         ids=["dp1", "dp2-zero1", "tp2", "dp2-zero3", "sp2"])
def test_validation_on_the_workers_equals_one_process_evaluation(data_dir, tmp_path, layout):
    spec = make_spec(data_dir, tmp_path, **layout)
    outcome = run_distributed(train_and_report, spec.parallel.num_workers, spec)[0]
    assert sorted(outcome.val_losses) == [2, 4]  # the interval and the last step
    assert outcome.val_losses[4] == pytest.approx(one_process_validation(spec), rel=1e-5)
    name = "-".join(f"{k}{v}" for k, v in layout.items()) or "dp1"
    val_losses[name] = outcome.val_losses
    # Every layout trains the same model (training equivalence) and so scores the same losses.
    first = next(iter(val_losses.values()))
    for step in (2, 4):
        assert outcome.val_losses[step] == pytest.approx(first[step], rel=1e-5)


@pytest.mark.distributed
def test_a_tensor_parallel_zero_3_run_exported_gives_the_pipelines_validation_loss_in_plain_transformers(data_dir,
                                                                                                       tmp_path):
    """Trained under ZeRO-3 with tensor parallelism (tp 2 x dp 2 on 4 ranks), validated on the workers in that
    layout, consolidated (each tensor-parallel rank's ZeRO-3 shards, then the AutoTP slices) and exported in shards:
    transformers' model scores the validation windows within 1e-4 of the pipeline's validation loss, which equals
    the other layouts'."""
    from pathlib import Path

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from data_prep.blend import open_split
    from pipeline.checkpoint.consolidate import consolidated_state_dict
    from pipeline.checkpoint.layout import checkpoint_root, latest_complete
    from pipeline.evaluation.export import hf_weights, write_weights

    spec = make_spec(data_dir, tmp_path / "run", workers=4, tp=2, zero=3, micro=4)
    outcome = run_distributed(train_and_report, 4, spec)[0]
    for other in val_losses.values():
        assert outcome.val_losses[STEPS] == pytest.approx(other[STEPS], rel=1e-5)
    model_class, hf_cfg, weights = hf_weights(MODEL, consolidated_state_dict(latest_complete(checkpoint_root(Path(spec.run_dir)))))
    hf_cfg.architectures = [model_class.__name__]
    hf_cfg.save_pretrained(tmp_path / "hf")
    write_weights(tmp_path / "hf", weights, torch.float32, 50_000, {"lm_head.weight"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    windows = torch.from_numpy(open_split(Path(data_dir), "validation").windows(np.arange(37)).astype(np.int64))
    with torch.no_grad():
        logits = hf(input_ids=windows[:, :-1]).logits
    hf_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()
    assert hf_loss == pytest.approx(outcome.val_losses[STEPS], abs=1e-4)
