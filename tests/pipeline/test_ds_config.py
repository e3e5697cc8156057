"""The DeepSpeed config generated from the Hydra config, read back through DeepSpeed's own config models."""

from __future__ import annotations

import pytest

from pipeline.config import ParallelConfig, TrainConfig
from pipeline.model.tensor_parallel import AUTOTP_LAYER_SPECS
from pipeline.train.ds_config import make_ds_config, resolve_precision


def test_fp16_gets_dynamic_loss_scaling_that_deepspeed_accepts():
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    config = make_ds_config(TrainConfig(), ParallelConfig(use_gpu=True, precision="fp16"), "fp16", 2)
    fp16 = DeepSpeedFP16Config(**config["fp16"])
    assert fp16.enabled and fp16.loss_scale == 0 and fp16.initial_dynamic_scale() == 2**16
    assert config["bf16"] == {"enabled": False}


def test_batch_clipping_zero_and_tensor_parallel_follow_the_config():
    train = TrainConfig(micro_batch_size=4, grad_clip=0.5)
    config = make_ds_config(train, ParallelConfig(num_workers=4, tensor_parallel=2, zero_stage=2), "bf16", 3)
    # DeepSpeed counts tensor-parallel ranks in the world size: micro x accum x all workers.
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 3)
    assert config["train_batch_size"] == 4 * 3 * 4
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True} and not config["fp16"]["enabled"]
    assert config["tensor_parallel"]["autotp_size"] == 2
    assert config["tensor_parallel"]["partition_config"]["layer_specs"] == AUTOTP_LAYER_SPECS
    assert "tensor_parallel" not in make_ds_config(train, ParallelConfig(num_workers=4), "fp32", 1)


def test_auto_precision_falls_back_to_fp32_on_a_cpu_without_bf16(monkeypatch):
    import pipeline.train.ds_config as ds_config

    monkeypatch.setattr(ds_config, "cpu_supports_bf16", lambda: False)
    assert resolve_precision(ParallelConfig(precision="auto")) == "fp32"
    monkeypatch.setattr(ds_config, "cpu_supports_bf16", lambda: True)
    assert resolve_precision(ParallelConfig(precision="auto")) == "bf16"
    assert resolve_precision(ParallelConfig(precision="fp32")) == "fp32"
    with pytest.raises(Exception, match="fp16 needs a GPU"):
        resolve_precision(ParallelConfig(precision="fp16"))
