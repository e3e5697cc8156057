"""The memory and time planner against hand calculations (Rajbhandari et al. 2020: 2 + 2 + 12 bytes per
parameter in mixed precision; Korthikanti et al. 2022 for activations), and `pipeline train` refusing a layout
that does not fit before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from pipeline.model.size import count_parameters
from pipeline.train.memory_plan import (
    GIB,
    check_layout_fits,
    layouts_that_fit,
    parse_memory,
    plan_memory,
    report,
    step_seconds,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def model(name: str) -> ModelConfig:
    import yaml

    return ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


def within(value: float, expected: float, rel: float = 0.10) -> bool:
    return abs(value - expected) <= rel * expected


def test_175b_at_1024_ranks_tp_8_zero_1_matches_the_hand_calculation():
    """175e9 parameters split over tp=8 (the embeddings, replicated, are under 1%). Mixed precision as
    Rajbhandari et al. count it (fp16): 2 bytes of weights and 2 of gradients per parameter of the rank, and 12
    bytes of optimizer state spread over dp = 128. bf16 at ZeRO-1 keeps fp32 weights and gradients under
    autocast: 4 + 4, and Adam's 8 spread over dp (pipeline.train.ds_config.bf16_settings)."""
    per_rank = 175e9 / 8
    p = ParallelConfig(num_workers=1024, tensor_parallel=8, zero_stage=1, precision="fp16")
    plan = plan_memory(model("gpt3_175b"), p, TrainConfig(micro_batch_size=1), "fp16")
    assert within(plan.parameters, 2 * per_rank)
    assert within(plan.gradients, 2 * per_rank)
    assert within(plan.optimizer, 12 * per_rank / 128)
    assert within(plan.model_states, 4 * per_rank + 12 * per_rank / 128)
    bf16 = plan_memory(model("gpt3_175b"), p, TrainConfig(micro_batch_size=1), "bf16")
    assert within(bf16.model_states, 8 * per_rank + 8 * per_rank / 128)


def test_175b_at_1024_ranks_tp_8_zero_3_partitions_each_slice_over_the_data_parallel_ranks():
    """tp 8 x ZeRO-3: every weight, its fp32 gradient partition and its 12 bytes of Adam over tp x dp = 1024 (the
    embeddings and the output head, which AutoTP leaves whole, over dp = 128, as zero3_partition_group builds them): 2 + 4 + 12 bytes of the
    rank's share of each parameter, and DeepSpeed's fp32 copy of its gradient partition (a sub-group at most). It fits 80 GB at
    micro-batch 1; at 8 without recomputation the activations do not, and the verdict says what does."""
    m = model("gpt3_175b")
    p = ParallelConfig(num_workers=1024, tensor_parallel=8, zero_stage=3)
    embeddings = 2 * m.vocab_size * m.d_model + m.context_length * m.d_model  # untied: the output head too
    share = (count_parameters(m).total - embeddings) / 1024 + embeddings / 128
    plan = plan_memory(m, p, TrainConfig(micro_batch_size=1), "bf16")
    assert within(plan.parameters, 2 * share, rel=0.01) and within(plan.gradients, 4 * share, rel=0.01)
    assert within(plan.model_states, 18 * share, rel=0.01)
    text, fits = report(m, p, TrainConfig(micro_batch_size=1), "bf16", 80e9, None, 0.4, 1e9)
    assert fits and "dp 128 x tp 8; ZeRO-3" in text
    text, fits = report(m, p, TrainConfig(micro_batch_size=8), "bf16", 80e9, None, 0.4, 1e9)
    assert not fits and "ZeRO-3, tp=8, activation checkpointing" in text
    micro = int(text.split("train.micro_batch_size=")[1].split()[0])
    trial = TrainConfig(micro_batch_size=micro)
    assert plan_memory(m, p, trial, "bf16").total <= 0.9 * 80e9
    assert plan_memory(m, p, TrainConfig(micro_batch_size=micro + 1), "bf16").total > 0.9 * 80e9


@pytest.mark.parametrize(("precision", "stage", "bytes_per_param"), [
    ("fp16", 0, 16.0), ("fp16", 1, 4 + 12 / 8), ("fp16", 2, 2 + 14 / 8), ("fp16", 3, 16 / 8),
    # bf16 keeps gradients in fp32: at ZeRO 0 and 1 the weights are fp32 under autocast (4 + 4 + 8, the 8 of
    # Adam sharded at ZeRO-1); under ZeRO-3 the gradient partition is fp32 (2 + 4 + 12 over dp); at ZeRO-2 the
    # fp32 accumulation buffer is a DeepSpeed copy beside the model states.
    ("bf16", 0, 16.0), ("bf16", 1, 8 + 8 / 8), ("bf16", 2, 2 + 14 / 8), ("bf16", 3, 18 / 8),
])
def test_13b_model_states_per_zero_stage(precision, stage, bytes_per_param):
    """13B at dp = 8: ZeRO-1 shards the 12 optimizer bytes, ZeRO-2 the gradients too, ZeRO-3 everything."""
    m = model("gpt3_13b")
    plan = plan_memory(m, ParallelConfig(num_workers=8, zero_stage=stage), TrainConfig(micro_batch_size=1), precision)
    assert within(plan.model_states, bytes_per_param * 13e9)


def test_activations_follow_korthikanti_without_attention_scores():
    m = model("gpt3_13b")  # s 2048, h 5120, 40 layers, dropout 0
    train = TrainConfig(micro_batch_size=2)
    plan = plan_memory(m, ParallelConfig(num_workers=8), train, "bf16")
    assert plan.activations == pytest.approx(40 * 2048 * 2 * 5120 * 32)  # 8 + 24 bytes per s b h per layer
    tp2 = plan_memory(m, ParallelConfig(num_workers=8, tensor_parallel=2), train, "bf16")
    assert tp2.activations == pytest.approx(40 * 2048 * 2 * 5120 * (8 + 12))
    fp32 = plan_memory(m, ParallelConfig(num_workers=8), train, "fp32")
    assert fp32.activations == pytest.approx(2 * plan.activations)
    recompute = plan_memory(m, ParallelConfig(num_workers=8, activation_checkpointing=True), train, "bf16")
    assert recompute.activations == pytest.approx(40 * 2 * 2048 * 2 * 5120 + 2048 * 2 * 5120 * 32)
    # bf16 logits and their gradient; the loss upcasts one chunk at a time (copy, log-softmax, gradient in fp32)
    assert plan.logits == pytest.approx(2 * 2048 * 50257 * (2 + 2) + 2**24 * 12)
    assert fp32.logits == pytest.approx(2 * 2048 * 50257 * 12)


def test_deepspeed_fp32_copies_beside_the_model_states():
    m = ModelConfig(vocab_size=1000, n_layer=2, d_model=64, n_head=4)
    n = count_parameters(m).total
    train = TrainConfig(micro_batch_size=1)
    zero0 = plan_memory(m, ParallelConfig(num_workers=1, zero_stage=0), train, "fp32")
    zero1 = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=1), train, "fp32")
    assert (zero0.model_states, zero0.fp32_copies) == (16 * n, 0)
    assert (zero1.model_states, zero1.fp32_copies) == (8 * n + 8 * n / 2, 8 * n / 2)
    bf16 = plan_memory(m, ParallelConfig(num_workers=1, zero_stage=0), train, "bf16")
    assert (bf16.model_states, bf16.fp32_copies) == (16 * n, 2 * n)  # fp32 weights, autocast's bf16 copies
    bf16 = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=1), train, "bf16")
    assert (bf16.model_states, bf16.fp32_copies) == (8 * n + 8 * n / 2, 8 * n / 2)  # as fp32 (measured)
    zero2 = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=2), train, "bf16")
    assert (zero2.model_states, zero2.fp32_copies) == (2 * n + 14 * n / 2, 4 * n / 2)  # fp32 gradient partition
    fp16_zero0 = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=0), train, "fp16")
    assert fp16_zero0.fp32_copies == 4 * n + 2 * n  # and the engine's fp16 all-reduce bucket at dp > 1
    fp16 = plan_memory(m, ParallelConfig(num_workers=1, zero_stage=0), train, "fp16")
    assert (fp16.model_states, fp16.fp32_copies) == (16 * n, 4 * n)  # the fp16 optimizer's fp32 gradients


def test_tensor_parallel_splits_exactly_the_sharded_projections():
    """The same count the tp=2 equivalence test measures on real ranks: Q/K/V/O, up/down and the
    column-parallel biases halve; embeddings, norms and row-parallel biases stay whole."""
    m = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64)
    full = count_parameters(m).total
    halved = 2 * (4 * 32 * 32 + 2 * 32 * 64 + 3 * 32 + 64) // 2
    p1 = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=0, tensor_parallel=1), TrainConfig(), "fp32")
    p2 = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=0, tensor_parallel=2), TrainConfig(), "fp32")
    assert p1.parameters == 4 * full
    assert p2.parameters == 4 * (full - halved)


def test_sequence_parallelism_divides_activations_and_logits_not_the_model_states():
    """A rank of a sequence-parallel group keeps the activations and logits of context / sp positions; ZeRO
    partitions the states over all ranks, as without it. The report names the layout dp x sp."""
    m = model("gpt3_13b")
    train = TrainConfig(micro_batch_size=1)
    one = plan_memory(m, ParallelConfig(num_workers=8, zero_stage=3), train, "bf16")
    sp4 = plan_memory(m, ParallelConfig(num_workers=8, zero_stage=3, sequence_parallel=4), train, "bf16")
    assert sp4.activations == pytest.approx(one.activations / 4)
    assert sp4.logits == pytest.approx(512 * 50257 * 4 + 2**24 * 12)
    assert sp4.model_states == one.model_states and sp4.fp32_copies == one.fp32_copies
    text, _ = report(m, ParallelConfig(num_workers=8, zero_stage=3, sequence_parallel=4), train, "bf16", None, None,
                     0.4, 1e9)
    assert "8 ranks = dp 2 x sp 4" in text
    # The layouts it suggests keep sequence parallelism, so none adds tensor parallelism (not combinable).
    fits = layouts_that_fit(m, ParallelConfig(num_workers=8, zero_stage=0, sequence_parallel=4), train, "bf16",
                            80 * GIB)
    assert fits and all(layout.tensor_parallel == 1 for layout in fits)


def test_an_asynchronous_checkpoint_on_cpu_counts_its_copy_in_the_ranks_ram():
    """train.async_checkpoint keeps a copy of the saved weights and optimizer states in host memory: on CPU that is
    the rank's RAM, which the check divides between the ranks (a 2-rank 307 M-parameter run the plan passed
    without it was killed by Ray's memory monitor); on a GPU it is not the device's memory."""
    m = ModelConfig(vocab_size=4096, context_length=128, n_layer=24, n_head=4, d_model=1024, d_ff=4096)
    cpu = ParallelConfig(num_workers=2, zero_stage=1)
    sync = plan_memory(m, cpu, TrainConfig(micro_batch_size=1), "bf16")
    on = plan_memory(m, cpu, TrainConfig(micro_batch_size=1, async_checkpoint=True), "bf16")
    assert on.checkpoint_copy == sync.parameters + sync.optimizer and on.total == sync.total + on.checkpoint_copy
    text, _ = report(m, cpu, TrainConfig(micro_batch_size=1, async_checkpoint=True), "bf16", 12 * GIB, None, 0.4, 1e9)
    assert "async checkpoint copy" in text
    gpu = plan_memory(m, ParallelConfig(num_workers=2, zero_stage=1, use_gpu=True),
                      TrainConfig(micro_batch_size=1, async_checkpoint=True), "bf16")
    assert gpu.checkpoint_copy == 0


def test_verdict_and_the_layouts_that_fit():
    m = model("gpt3_13b")
    train = TrainConfig(micro_batch_size=1)
    parallel = ParallelConfig(num_workers=8, zero_stage=1, use_gpu=True)
    text, fits = report(m, parallel, train, "bf16", 80 * GIB, 989, 0.4, 1e9)
    assert not fits and "does not fit" in text and "ZeRO-3, tp=1" in text
    others = layouts_that_fit(m, parallel, train, "bf16", 80 * GIB)
    assert others, "13B on 8 x 80 GiB fits somehow"
    for layout in others:  # every suggestion does fit
        trial = ParallelConfig(num_workers=8, zero_stage=layout.zero_stage, tensor_parallel=layout.tensor_parallel,
                               activation_checkpointing=layout.activation_checkpointing)
        assert plan_memory(m, trial, train, "bf16").total <= 0.9 * 80 * GIB
    text, fits = report(m, ParallelConfig(num_workers=8, zero_stage=3), train, "bf16", 80 * GIB, None, 0.4, 1e9)
    assert fits and "fits:" in text


def test_step_time_is_flops_over_ranks_peak_and_mfu():
    m = model("gpt3_13b")
    train = TrainConfig(global_batch_tokens=2**20)
    from pipeline.model.size import training_flops_per_token

    seconds = step_seconds(m, ParallelConfig(num_workers=8), train, 989.0, 0.4)
    assert seconds == pytest.approx(training_flops_per_token(m) * 2**20 / (8 * 989e12 * 0.4))


def test_memory_sizes_parse():
    assert parse_memory("80GB") == 80 * GIB
    assert parse_memory("141GiB") == 141 * GIB
    assert parse_memory("24576MB") == 24 * GIB
    with pytest.raises(ConfigError, match="not a size"):
        parse_memory("lots")


def test_check_against_the_device_or_on_cpu_the_hosts_ram_per_rank():
    import psutil
    import torch

    m, huge = model("gpt3_13b"), model("gpt3_175b")  # 175B: about 1.6 TiB per rank of 2, more than any host
    train = TrainConfig(micro_batch_size=1)
    if not torch.cuda.is_available():
        check_layout_fits(m, ParallelConfig(num_workers=2, use_gpu=True), train, "bf16")  # GPUs are elsewhere
    host = psutil.virtual_memory().total / GIB
    with pytest.raises(ConfigError, match=rf"host RAM {host:.1f} GiB / 2 ranks"):
        check_layout_fits(huge, ParallelConfig(num_workers=2), train, "bf16")
    with pytest.raises(ConfigError, match=rf"host RAM {host:.1f} GiB / 1 rank\b"):  # one rank per node
        check_layout_fits(huge, ParallelConfig(num_workers=2), train, "bf16", workers_per_node=1)
    check_layout_fits(huge, ParallelConfig(num_workers=2, check_memory=False), train, "bf16")
    with pytest.raises(ConfigError, match=r"(?s)does not fit.*parallel.check_memory=false"):
        check_layout_fits(m, ParallelConfig(num_workers=2, device_memory_gb=80), train, "bf16")
    check_layout_fits(m, ParallelConfig(num_workers=2, device_memory_gb=80, check_memory=False), train, "bf16")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_pipeline_plan_prints_memory_and_a_verdict(tmp_path):
    out = run_cli("plan", "model=gpt3_175b", "parallel.num_workers=1024", "parallel.tensor_parallel=8",
                  "parallel.zero_stage=1", "--gpu-memory", "80GB", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "memory per rank" in out.stdout and "verdict: does not fit" in out.stdout
    out = run_cli("plan", "model=gpt3_13b", "parallel.num_workers=8", "parallel.zero_stage=3",
                  "train.micro_batch_size=1", "--gpu", "H100", "--tokens", "2.6e11", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "verdict: fits" in out.stdout and "days" in out.stdout


def test_train_refuses_a_layout_that_does_not_fit_before_any_work(tmp_path):
    out = run_cli("train", "model=gpt3_13b", "parallel.device_memory_gb=80", "train.global_batch_tokens=32768",
                  f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "does not fit" in out.stderr and "parallel.check_memory=false" in out.stderr
    assert not (tmp_path / "out").exists()  # no data prepared, no run opened
