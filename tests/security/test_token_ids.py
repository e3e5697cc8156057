"""Token ids from a data set are untrusted: an id outside the vocabulary is named before the first step and on any
read, never an IndexError inside a worker (or, on a GPU, a device-side assert)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from distributed_helpers import run_distributed

from data_prep.shards import HEADER_BYTES, ShardError, WindowDataset, verify_dataset, write_synthetic_dataset
from pipeline.config import DataConfig, ModelConfig, PipelineConfig
from pipeline.files import sha256_file


def forged_dataset(tmp_path, tokenizer=None):
    """A data set of vocabulary 64 whose 5th training window holds the id 1000, its manifest fixed up so that
    every checksum matches (an attacker's data set, not a damaged one)."""
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 64, size=(40, 17))
    ds = write_synthetic_dataset(tmp_path / "ds", windows, vocab_size=64, val_windows=4, tokenizer=tokenizer)
    shard = ds / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    at = HEADER_BYTES + (5 * 17 + 3) * 2
    data[at:at + 2] = (1000).to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"][0]["sha256"] = sha256_file(shard)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    return ds


def test_an_out_of_range_id_is_named_at_verify_before_training_and_on_every_read(tmp_path):
    from pipeline.train.driver import resolve_run

    ds = forged_dataset(tmp_path)
    message = r"train_00000.bin holds the token id 1000, outside the data set's vocabulary of 64 tokens"
    assert any("holds the token id 1000" in p for p in verify_dataset(ds))
    cfg = PipelineConfig(output_dir=str(tmp_path / "out"), model=ModelConfig(context_length=16),
                         data=DataConfig(context_length=16))
    with pytest.raises(ShardError, match=message):
        resolve_run(cfg, ds)  # on the driver, before any worker starts
    windows = WindowDataset(ds, "train")
    assert windows.windows(np.arange(5)).max() < 64  # the windows before it read fine
    with pytest.raises(ShardError, match=message):
        windows.windows(np.array([2, 5]))


def train_it(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


def test_with_checksums_off_the_worker_stops_at_its_first_batch_naming_the_shard(tmp_path):
    """data.verify_checksums=false skips the driver's scan; the worker's reads still refuse the id."""
    from pipeline.config import ParallelConfig, TrainConfig
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec

    ds = forged_dataset(tmp_path)
    model = ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16, d_ff=32)
    train = TrainConfig(max_steps=30, micro_batch_size=8, warmup_steps=1, global_batch_tokens=8 * 16,
                        log_interval_steps=1, peak_tflops=1.0)
    parallel = ParallelConfig(num_workers=1, zero_stage=0, precision="fp32")
    spec = RunSpec(model=model, train=train, parallel=parallel, data_dir=str(ds), run_dir=str(tmp_path / "run"),
                   precision="fp32", grad_accum_steps=1, ds_config=make_ds_config(train, parallel, "fp32", 1),
                   flops_per_token=1.0, config_fingerprint="f", math_config={}, tokenizer_sha256="")
    with pytest.raises(RuntimeError, match=r"ShardError: shard .*train_00000.bin holds the token id 1000") as err:
        run_distributed(train_it, 1, dataclasses.replace(spec))
    assert "IndexError" not in str(err.value)


def test_data_inspect_verify_reports_the_id(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some text to learn pieces from, word{i % 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=64,
                                   model_type="bpe", minloglevel=2)
    ds = forged_dataset(tmp_path, tokenizer=tmp_path / "sp.model")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "inspect", str(ds), "--verify"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "train_00000.bin holds the token id 1000, outside the data set's vocabulary of 64" in done.stderr


def test_a_blend_whose_data_set_has_a_larger_vocabulary_is_refused(tmp_path):
    """The model is built from the blend's vocabulary: a component that declares (and holds) more ids than the
    blend says would feed ids past the embedding. The blend is refused, naming the data set and the field."""
    from data_prep.blend import BLEND, blend_incomplete_reason, open_split, write_blend

    root = tmp_path / "data"
    small = write_synthetic_dataset(root / "small", np.ones((8, 17), dtype=np.int64), 64, val_windows=1)
    blend_dir = root / "mix"
    write_blend(blend_dir, [("a", small, 1.0)])
    blend = json.loads((blend_dir / BLEND).read_text())
    big = write_synthetic_dataset(root / "big", np.full((8, 17), 900, dtype=np.int64), 1000, val_windows=1)
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = blend["tokenizer_sha256"]
    (big / "manifest.json").write_text(json.dumps(manifest))
    blend["components"][0]["dataset"] = "../big"
    (blend_dir / BLEND).write_text(json.dumps(blend))
    message = r"the blend .*mix has vocab_size=64 but its data set 'a' .*big\) has 1000"
    with pytest.raises(ShardError, match=message):
        open_split(blend_dir, "train")
    assert "vocab_size=64" in blend_incomplete_reason(blend_dir)
