"""The DeepSpeed config generated from the Hydra config, read back through DeepSpeed's own config models."""

from __future__ import annotations

import pytest

from pipeline.config import ParallelConfig, TrainConfig
from pipeline.model.tensor_parallel import AUTOTP_LAYER_SPECS
from pipeline.train.ds_config import check_with_deepspeed, make_ds_config, resolve_precision


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


def test_expert_settings_merge_into_the_generated_config_and_deepspeed_checks_them():
    from pipeline.config import ConfigError
    from pipeline.train.ds_config import check_with_deepspeed

    parallel = ParallelConfig(num_workers=2, zero_stage=2, deepspeed={
        "zero_optimization": {"reduce_bucket_size": 5_000_000, "overlap_comm": True},
        "wall_clock_breakdown": True,
    })
    config = make_ds_config(TrainConfig(), parallel, "fp32", 1)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5_000_000, "overlap_comm": True}
    assert config["wall_clock_breakdown"] is True and config["gradient_clipping"] == 1.0  # the rest stays
    check_with_deepspeed(config)
    typo = ParallelConfig(zero_stage=2, deepspeed={"zero_optimization": {"reduce_bucket_sise": 5}})
    with pytest.raises(ConfigError, match="reduce_bucket_sise"):
        check_with_deepspeed(make_ds_config(TrainConfig(), typo, "fp32", 1))
    wrong_type = ParallelConfig(zero_stage=2, deepspeed={"zero_optimization": {"overlap_comm": "sometimes"}})
    with pytest.raises(ConfigError, match="overlap_comm"):
        check_with_deepspeed(make_ds_config(TrainConfig(), wrong_type, "fp32", 1))


def test_optimizer_offload_is_a_switch_that_needs_zero():
    from pipeline.config import ConfigError, ModelConfig, validate_parallel

    config = make_ds_config(TrainConfig(), ParallelConfig(zero_stage=1, offload_optimizer=True), "fp32", 1)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert config["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="offload_optimizer=true needs ZeRO"):
        validate_parallel(ParallelConfig(zero_stage=0, offload_optimizer=True), ModelConfig())


def test_communication_buckets_follow_the_model_width():
    """DeepSpeed's fixed defaults (5e8-element buckets, 1e9 live ZeRO-3 elements) are sized for no model in
    particular; given d_model the buckets follow it, and an expert setting still wins."""
    zero3 = make_ds_config(TrainConfig(), ParallelConfig(zero_stage=3), "bf16", 1, d_model=8192)["zero_optimization"]
    assert zero3 == {"stage": 3, "reduce_bucket_size": 8192**2, "stage3_prefetch_bucket_size": int(0.9 * 8192**2),
                     "stage3_param_persistence_threshold": 81920, "stage3_max_live_parameters": 10 * 8192**2,
                     "stage3_max_reuse_distance": 10 * 8192**2, "sub_group_size": 10 * 8192**2}
    zero1 = make_ds_config(TrainConfig(), ParallelConfig(zero_stage=1), "bf16", 1, d_model=1024)["zero_optimization"]
    assert zero1 == {"stage": 1, "reduce_bucket_size": 2**24}  # a floor: tiny buckets are latency-bound
    assert make_ds_config(TrainConfig(), ParallelConfig(zero_stage=0), "bf16", 1, d_model=1024)["zero_optimization"] == {
        "stage": 0}
    expert = ParallelConfig(zero_stage=2, deepspeed={"zero_optimization": {"reduce_bucket_size": 7}})
    assert make_ds_config(TrainConfig(), expert, "bf16", 1, d_model=1024)["zero_optimization"]["reduce_bucket_size"] == 7


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    """ZeRO 2-3: DeepSpeed's bf16 with fp32 gradient accumulation and communication; ZeRO 0-1 fp32 weights under
    autocast (pipeline.train.ds_config.bf16_settings says why). fp32 and fp16 configs carry neither."""
    train, accum = TrainConfig(micro_batch_size=2), 1
    for stage in (2, 3):
        config = make_ds_config(train, ParallelConfig(num_workers=2, zero_stage=stage), "bf16", accum)
        assert config["bf16"] == {"enabled": True}
        assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
        assert "torch_autocast" not in config
    for stage in (0, 1):
        zero0 = make_ds_config(train, ParallelConfig(num_workers=2, zero_stage=stage), "bf16", accum)
        assert zero0["bf16"] == {"enabled": False} and "data_types" not in zero0
        assert zero0["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    for precision in ("fp32", "fp16"):
        config = make_ds_config(train, ParallelConfig(num_workers=2, zero_stage=1), precision, accum)
        assert config["bf16"] == {"enabled": False} and "data_types" not in config and "torch_autocast" not in config
    check_with_deepspeed(zero0)


def test_muon_trains_under_zero_3_without_reduce_scatter_and_is_refused_where_deepspeed_cannot_run_it():
    """DeepSpeed's ZeRO-3 runs Muon only without reduce-scatter (it raises "Muon and reduce scatter cannot be
    used together" otherwise); Muon with AutoTP or optimizer offload is refused with the reason."""
    from pipeline.config import ConfigError, ModelConfig
    from pipeline.config.train import validate_train

    muon, model = TrainConfig(optimizer="muon"), ModelConfig(vocab_size=64)
    zero3 = ParallelConfig(num_workers=2, zero_stage=3)
    validate_train(muon, zero3, model)
    assert make_ds_config(muon, zero3, "fp32", 1)["zero_optimization"]["reduce_scatter"] is False
    assert "reduce_scatter" not in make_ds_config(TrainConfig(), zero3, "fp32", 1)["zero_optimization"]
    with pytest.raises(ConfigError, match="offload_optimizer=true: DeepSpeed's offloaded"):
        validate_train(muon, ParallelConfig(num_workers=2, zero_stage=3, offload_optimizer=True), model)
    with pytest.raises(ConfigError, match="tensor_parallel > 1: Muon orthogonalises each whole matrix"):
        validate_train(muon, ParallelConfig(num_workers=2, tensor_parallel=2, zero_stage=3), model)
