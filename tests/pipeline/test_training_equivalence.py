"""Real multi-process DeepSpeed runs on CPU (gloo), fp32: every layout of the same global batch trains the
same model. tp=2 vs tp=1, dp=2 x b vs dp=1 x 2b, ZeRO 1/2/3 vs ZeRO 0, accumulation 2 x b vs 1 x 2b."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.config import ModelConfig, ParallelConfig, TrainConfig
from pipeline.train.ds_config import make_ds_config

pytestmark = pytest.mark.distributed

STEPS = 5
MODEL = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    # Token streams with structure (arithmetic sequences mod vocab) so that the loss moves.
    starts = rng.integers(0, 64, size=(256, 1))
    steps = rng.integers(1, 4, size=(256, 1))
    windows = (starts + steps * np.arange(17)[None, :]) % 64
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), windows, vocab_size=64, val_windows=16)


def make_spec(data_dir, run_dir, *, workers=1, tp=1, sp=1, zero=0, micro=4, accum=1, precision="fp32",
              recompute=False, model=MODEL):
    from pipeline.train.run_spec import RunSpec

    train = TrainConfig(max_steps=STEPS, micro_batch_size=micro, warmup_steps=1, lr=1e-2, resume="none",
                        global_batch_tokens=micro * accum * (workers // (tp * sp)) * 16, log_interval_steps=1,
                        peak_tflops=1.0)
    parallel = ParallelConfig(num_workers=workers, tensor_parallel=tp, sequence_parallel=sp, zero_stage=zero,
                              precision=precision, activation_checkpointing=recompute)
    return RunSpec(
        model=model, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
        precision=precision, grad_accum_steps=accum,
        ds_config=make_ds_config(train, parallel, precision, accum, d_model=model.d_model),
        flops_per_token=1.0, config_fingerprint="test", math_config={}, tokenizer_sha256="", record_losses=True,
    )


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


def outcomes_of(spec):
    return run_distributed(train_and_report, spec.parallel.num_workers, spec)


def losses_of(spec) -> list[float]:
    losses = outcomes_of(spec)[0].losses
    return [losses[s] for s in range(STEPS)]


def grad_norms_of(outcome) -> list[float]:
    return [outcome.grad_norms[s] for s in range(STEPS)]


def weights_of(spec):
    from pathlib import Path

    from pipeline.checkpoint.consolidate import consolidated_state_dict
    from pipeline.checkpoint.layout import checkpoint_root, latest_complete

    return consolidated_state_dict(latest_complete(checkpoint_root(Path(spec.run_dir))))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    spec = make_spec(data_dir, tmp_path_factory.mktemp("ref"), workers=1, micro=4)
    (outcome,) = outcomes_of(spec)
    reference_grad_norms[:] = grad_norms_of(outcome)
    return spec, [outcome.losses[s] for s in range(STEPS)]


# Per-step gradient norms of the reference run (ZeRO-0, one rank), filled in by the fixture.
reference_grad_norms: list[float] = []


def assert_same(losses, expected, rel=1e-5):
    assert losses == pytest.approx(expected, rel=rel), (losses, expected)


def assert_same_weights(ours, theirs):
    """Equal up to float reordering. atol 1e-4: the key biases get (mathematically) zero gradients, so Adam
    turns rounding noise into updates of ~lr * noise; a wrong update moves weights by ~lr = 1e-2."""
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4), name


def test_reference_run_learns(reference):
    _, losses = reference
    assert losses[-1] < losses[0] - 0.1


def test_data_parallel_two_ranks_equal_one_rank_with_double_batch(reference, data_dir, tmp_path):
    _, expected = reference
    assert_same(losses_of(make_spec(data_dir, tmp_path, workers=2, micro=2)), expected)


def test_gradient_accumulation_equals_a_larger_micro_batch(reference, data_dir, tmp_path):
    _, expected = reference
    assert_same(losses_of(make_spec(data_dir, tmp_path, workers=1, micro=2, accum=2)), expected)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_stages_equal_zero_0(reference, data_dir, tmp_path, zero):
    ref_spec, expected = reference
    spec = make_spec(data_dir, tmp_path, workers=2, micro=2, zero=zero)
    outcome = outcomes_of(spec)[0]
    assert_same([outcome.losses[s] for s in range(STEPS)], expected)
    # DeepSpeed's gradient norm (ZeRO >= 1) equals the one the loop computes at ZeRO-0, which is logged.
    assert_same(grad_norms_of(outcome), reference_grad_norms, rel=1e-4)
    # The consolidated checkpoint holds the same weights as the reference run's.
    assert_same_weights(weights_of(spec), weights_of(ref_spec))


def test_activation_checkpointing_under_zero_3_equals_zero_0(reference, data_dir, tmp_path):
    """Recomputing each block in the backward pass, with ZeRO-3 gathering the weights again for it, changes
    nothing but memory."""
    _, expected = reference
    assert_same(losses_of(make_spec(data_dir, tmp_path, workers=2, micro=2, zero=3, recompute=True)), expected)


def test_torch_compile_gives_the_same_losses(reference, data_dir, tmp_path):
    """train.compile=true (DeepSpeed's engine.compile, torch.compile with Inductor on CPU): same numbers."""
    _, expected = reference
    spec = make_spec(data_dir, tmp_path, workers=1, micro=4)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, compile=True))
    assert_same(losses_of(spec), expected)


def test_tensor_parallel_two_equals_one(reference, data_dir, tmp_path):
    from pipeline.model.size import count_parameters

    ref_spec, expected = reference
    spec = make_spec(data_dir, tmp_path, workers=2, tp=2, micro=4)
    outcomes = outcomes_of(spec)
    assert_same([outcomes[0].losses[s] for s in range(STEPS)], expected)
    # Really sharded, not two replicas on the same batches: each rank holds half of every projection
    # (Q, K, V, O, up, down: 2 x 2 x (4 d^2 + 2 d d_ff) / 2 fewer elements; column-parallel biases halve too).
    full = count_parameters(MODEL).total
    d, d_ff, layers = MODEL.d_model, MODEL.d_ff, MODEL.n_layer
    halved = layers * (4 * d * d + 2 * d * d_ff + 3 * d + d_ff) // 2
    assert [o.local_parameters for o in outcomes] == [full - halved] * 2
    # The gradient norm sums the shards over the tensor-parallel group and counts replicated weights once.
    assert_same(grad_norms_of(outcomes[0]), reference_grad_norms, rel=1e-4)
    assert_same_weights(weights_of(spec), weights_of(ref_spec))


def test_tensor_parallel_two_with_zero_3_equals_one_rank(reference, data_dir, tmp_path):
    """tp 2 x dp 2 on 4 ranks under ZeRO-3 (AutoTP slices the weights built partitioned by zero.Init, ZeRO-3
    partitions each slice over the data-parallel group): the reference's losses, gradient norms and, consolidated
    from the ZeRO-3 shards of both tensor-parallel ranks, its weights."""
    from pipeline.model.size import count_parameters

    ref_spec, expected = reference
    spec = make_spec(data_dir, tmp_path, workers=4, tp=2, zero=3, micro=2)
    outcomes = outcomes_of(spec)
    assert_same([outcomes[0].losses[s] for s in range(STEPS)], expected)
    assert_same(grad_norms_of(outcomes[0]), reference_grad_norms, rel=1e-4)
    assert_same_weights(weights_of(spec), weights_of(ref_spec))
    # Each rank holds half (dp) of its half (tp) of every projection, and half of every replicated weight.
    full = count_parameters(MODEL).total
    d, d_ff, layers = MODEL.d_model, MODEL.d_ff, MODEL.n_layer
    halved = layers * (4 * d * d + 2 * d * d_ff + 3 * d + d_ff) // 2
    assert [o.local_parameters for o in outcomes] == [(full - halved) // 2] * 4


# Document masking on (token 0 separates documents: the windows hold several, and documents cross the middle of
# the window where the two sequence-parallel slices meet), with grouped-query attention (2 key/value heads, one
# per rank of the group).
DOCUMENTS = dataclasses.replace(MODEL, document_mask=True, eos_id=0, n_kv_head=2)


@pytest.mark.parametrize("positions", ["rotary", "learned", "alibi"])
def test_sequence_parallel_two_equals_one_rank_with_document_masking(data_dir, tmp_path, positions):
    """Ulysses sp 2 (each rank embeds and runs the layers on half of every window, all-to-all around attention)
    trains exactly what one rank does on whole windows: positions counted from each document's start (RoPE,
    learned) or ALiBi's slopes of each rank's heads, masks across the slice boundary, the loss and gradients of
    the whole window (validation: tests/pipeline/test_sharded_validation.py)."""
    model = dataclasses.replace(DOCUMENTS, pos_encoding=positions)
    eos = np.asarray(open_windows(data_dir)) == 0
    assert eos[:, 1:8].any() and eos[:, 8:16].any()  # documents start in both slices
    reference = outcomes_of(make_spec(data_dir, tmp_path / "one", model=model))[0]
    outcomes = outcomes_of(make_spec(data_dir, tmp_path / "sp", workers=2, sp=2, model=model))
    assert_same([outcomes[0].losses[s] for s in range(STEPS)], [reference.losses[s] for s in range(STEPS)])
    assert_same(grad_norms_of(outcomes[0]), grad_norms_of(reference), rel=1e-4)


@pytest.mark.parametrize("zero", [1, 3])
def test_sequence_parallel_two_with_data_parallel_two_under_zero_equals_one_rank(data_dir, tmp_path, zero):
    """sp 2 x dp 2 on 4 ranks under ZeRO (partitions and gradient reductions over all four ranks; under ZeRO-3 with
    activation checkpointing, whose recomputation exchanges again): the one-rank losses and, consolidated from the
    shards, its weights. ZeRO-3 found a DeepSpeed 0.19.8 defect: its reduce-scatter averaged the gradients over
    all ranks, not over the data-parallel replicas (the gradient norm exactly half the reference's; repaired by
    pipeline.train.distributed.repair_zero3_sequence_parallel_average)."""
    reference_spec = make_spec(data_dir, tmp_path / "one", model=DOCUMENTS)
    reference = outcomes_of(reference_spec)[0]
    spec = make_spec(data_dir, tmp_path / "sp", workers=4, sp=2, zero=zero, micro=2, model=DOCUMENTS,
                     recompute=zero == 3)
    outcomes = outcomes_of(spec)
    assert_same([outcomes[0].losses[s] for s in range(STEPS)], [reference.losses[s] for s in range(STEPS)])
    assert_same(grad_norms_of(outcomes[0]), grad_norms_of(reference), rel=1e-4)
    assert_same_weights(weights_of(spec), weights_of(reference_spec))


def open_windows(data_dir):
    from pathlib import Path

    from data_prep.blend import open_split

    dataset = open_split(Path(data_dir), "train")
    return dataset.windows(np.arange(len(dataset)))


bf16_losses: dict[int, list[float]] = {}  # per ZeRO stage, filled by test_bf16_training_tracks_fp32


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_bf16_training_tracks_fp32(reference, data_dir, tmp_path, zero):
    """bf16 follows the fp32 run to bf16 rounding at every ZeRO stage: fp32 master weights, gradients
    accumulated and reduced in fp32 (ZeRO 0-1 fp32 weights under autocast, ZeRO-3 DeepSpeed's bf16 with fp32
    gradient partitions)."""
    _, expected = reference
    losses = bf16_losses[zero] = losses_of(make_spec(data_dir, tmp_path, workers=2, micro=2, zero=zero,
                                                    precision="bf16"))
    assert losses == pytest.approx(expected, abs=0.05)
    assert losses[-1] < losses[0] - 0.1


def test_a_non_finite_bf16_step_is_skipped_and_retried_without_a_trace(data_dir, tmp_path):
    """bf16 under ZeRO-3 (DeepSpeed's bf16 mode, whose overflow check differs from fp32's) skips the NaN step
    too; the run ends as the bf16 run without it did."""
    expected = bf16_losses.get(3) or losses_of(make_spec(data_dir, tmp_path / "ref", workers=2, micro=2, zero=3,
                                                        precision="bf16"))
    spec = make_spec(data_dir, tmp_path / "nan", workers=2, micro=2, zero=3, precision="bf16")
    outcome = run_distributed(nan_once_then_train, 2, spec, 3)[0]
    assert outcome.failure is None and outcome.final_step == STEPS
    assert_same([outcome.losses[s] for s in range(STEPS)], expected)


def test_run_spec_is_plain_data():
    """RunSpec travels to Ray workers by pickling: it must stay plain data."""
    import pickle

    spec = make_spec("/tmp/d", "/tmp/r")
    assert dataclasses.asdict(pickle.loads(pickle.dumps(spec))) == dataclasses.asdict(spec)


def build_partitioned(spec):
    """The worker's model under ZeRO-3: what each rank holds locally, and the gathered weights."""
    import deepspeed

    from pipeline.train.distributed import init_distributed
    from pipeline.train.worker import build_model

    init_distributed(spec.parallel)
    model = build_model(spec, spec.ds_config)
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    full = sum(p.ds_numel for p in model.parameters())
    untouched = all(p.numel() == 0 for p in model.parameters())  # nothing but the partition is allocated
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return local, full, untouched, weights


@pytest.mark.parametrize("tied,precision", [(True, "fp32"), (False, "fp32"), (False, "bf16")])
def test_zero_3_builds_only_each_ranks_partition_with_the_same_initial_weights(tmp_path, tied, precision):
    """Under ZeRO-3 the model is created partitioned (deepspeed.zero.Init): each of 2 ranks holds about half of
    every parameter, no rank holds a whole one after construction, and the gathered weights equal a plain
    build's, bit for bit (in bf16: the plain build's fp32 weights cast, as ZeRO 0-2 get them)."""
    from pipeline.model.gpt import GPT
    from pipeline.train.distributed import seed_everything

    spec = make_spec(tmp_path, tmp_path / "run", workers=2, micro=2, zero=3, precision=precision)
    spec = dataclasses.replace(spec, model=dataclasses.replace(MODEL, tie_embeddings=tied))
    results = run_distributed(build_partitioned, 2, spec)
    seed_everything(spec.train.seed)
    expected = GPT(spec.model).state_dict()
    for local, full, untouched, weights in results:
        assert untouched
        assert full == sum(p.numel() for p in GPT(spec.model).parameters())
        assert local <= full / 2 + 2 * len(expected)  # half of each parameter, rounded up
        assert weights.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(weights[name], value.to(weights[name].dtype)), name


def test_optimizer_offloaded_to_cpu_equals_zero_0(reference, data_dir, tmp_path):
    """parallel.offload_optimizer (ZeRO-Offload, here with torch's AdamW): the same numbers."""
    _, expected = reference
    spec = make_spec(data_dir, tmp_path, workers=2, micro=2, zero=2)
    parallel = dataclasses.replace(spec.parallel, offload_optimizer=True)
    spec = dataclasses.replace(spec, parallel=parallel,
                              ds_config=make_ds_config(spec.train, parallel, "fp32", 1, d_model=MODEL.d_model))
    assert_same(losses_of(spec), expected)


def nan_once_then_train(spec, poisoned_forward: int):
    """train_worker, with the loss of one forward pass (the poisoned_forward-th, counting from 1) made NaN on
    every rank, as a loss spike would: that step's gradients are not finite."""
    import pipeline.train.worker as worker

    build = worker.build_engine
    calls = {"n": 0}

    def poisoned(spec, ds_config, **kwargs):
        engine = build(spec, ds_config, **kwargs)

        def hook(module, args, output):
            calls["n"] += 1
            logits, loss = output
            return (logits, loss * float("nan")) if calls["n"] == poisoned_forward and loss is not None else output

        engine.module.register_forward_hook(hook)
        return engine

    worker.build_engine = poisoned
    return worker.train_worker(spec)


@pytest.mark.parametrize("zero", [0, 1])
def test_a_non_finite_step_is_skipped_and_retried_without_a_trace(reference, data_dir, tmp_path, zero):
    """The update of a step with NaN gradients is skipped (by our optimizer without ZeRO, by DeepSpeed with it),
    the step is tried again on the same batch, and the run ends exactly as the reference does."""
    _, expected = reference
    spec = make_spec(data_dir, tmp_path, workers=2, micro=2, zero=zero)
    outcome = run_distributed(nan_once_then_train, 2, spec, 3)[0]  # the third step's forward
    assert outcome.failure is None and outcome.final_step == STEPS
    assert_same([outcome.losses[s] for s in range(STEPS)], expected)


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_checkpoints(data_dir, tmp_path, zero):
    """train.lr=1e6: the second step's gradients are NaN; after train.max_skipped_steps retries the run stops
    with a message naming the step, and the checkpoint of step 1 is complete and finite, nothing after it."""
    from pathlib import Path

    from pipeline.checkpoint.consolidate import consolidated_state_dict
    from pipeline.checkpoint.layout import checkpoint_root, complete_tags, latest_complete

    spec = make_spec(data_dir, tmp_path, workers=2, micro=2, zero=zero)
    train = dataclasses.replace(spec.train, lr=1e6, max_steps=10, save_interval_steps=1, max_skipped_steps=2)
    spec = dataclasses.replace(spec, train=train, ds_config=make_ds_config(train, spec.parallel, "fp32", 1))
    outcome = run_distributed(train_and_report, 2, spec)[0]
    assert outcome.failure and "diverged at step 2" in outcome.failure and "3 times in a row" in outcome.failure
    assert outcome.final_step == 1 and not outcome.preempted
    root = checkpoint_root(Path(spec.run_dir))
    assert complete_tags(root) == ["step_00000001"]
    weights = consolidated_state_dict(latest_complete(root))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_fp16_overflows_settle_the_loss_scale_without_stopping_the_run():
    """fp16's dynamic loss scaling skips steps while the scale settles: with a finite loss and a scale above
    the minimum such skips are counted apart and never stop the run; non-finite losses stop it after
    max_skipped_steps in a row, and so do overflows once the scale is at its minimum (DeepSpeed would raise on
    the next). The guard's decisions only: a CPU cannot run DeepSpeed's fp16."""
    from pipeline.train.callbacks import NonFiniteGuard
    from pipeline.train.loop import LoopState, StepResult

    class Lr:
        def get_lr(self):
            return [3e-4]

    def skips(results):
        guard, state = NonFiniteGuard(max_consecutive=2), LoopState(Lr(), 0, 100, rank=1)
        for result in results:
            (guard.after_skipped_step if not result.applied else guard.after_step)(state, result)
            if state.stopped:
                break
        return guard, state

    settling = [StepResult(7, 5.1, None, 0.0, applied=False, loss_scale=2.0**(15 - i)) for i in range(12)]
    guard, state = skips([*settling, StepResult(7, 5.1, 1.0, 0.0)])
    assert not state.stopped and (guard.overflows, guard.total, guard.consecutive) == (12, 12, 0)
    guard, state = skips([StepResult(7, float("nan"), None, 0.0, applied=False) for _ in range(4)])
    assert state.stopped and guard.total == 3 and "diverged at step 8" in state.failure
    at_minimum = [StepResult(7, 5.1, None, 0.0, applied=False, loss_scale=1.0) for _ in range(4)]
    guard, state = skips(at_minimum)
    assert state.stopped and guard.overflows == 3
