"""The 2026 model options and Muon in real multi-process DeepSpeed runs on CPU (gloo, fp32): a model with
grouped-query attention, QK-norm, z-loss, RoPE theta, µP and document masking trains (loss falls), trains the
same under tensor parallelism 2 and ZeRO-3 as on one rank, resumes exactly and exports (Qwen 3) with the same
logits; so does a BLOOM-like ALiBi model (BLOOM export); Muon trains the same under ZeRO 0, 1 and 2, and resumes
exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.config import ModelConfig, ParallelConfig, TrainConfig
from pipeline.train.ds_config import make_ds_config

pytestmark = pytest.mark.distributed

STEPS, EOS = 5, 1
MODERN = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                     pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False, qk_norm=True,
                     z_loss=1e-3, document_mask=True, eos_id=EOS, rope_theta=500000.0, mup_base_width=16)
ALIBI = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=128, pos_encoding="alibi",
                    embedding_norm=True, document_mask=True, eos_id=EOS)
PLAIN = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    # Arithmetic sequences mod vocab (so that the loss moves), cut by EOS into documents of 3 to 9 tokens.
    starts = rng.integers(2, 64, size=(256, 1))
    steps = rng.integers(1, 4, size=(256, 1))
    windows = 2 + (starts + steps * np.arange(17)[None, :]) % 62
    for row in windows:
        row[rng.choice(np.arange(2, 16), size=2, replace=False)] = EOS
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), windows, vocab_size=64, val_windows=16)


def make_spec(data_dir, run_dir, model, *, workers=1, tp=1, zero=0, micro=4, optimizer="adamw", steps=STEPS,
             save_every=0, grad_clip=1.0):
    from pipeline.train.run_spec import RunSpec

    train = TrainConfig(max_steps=steps, micro_batch_size=micro, warmup_steps=1, lr=1e-2, resume="auto",
                        global_batch_tokens=micro * (workers // tp) * 16, log_interval_steps=1, peak_tflops=1.0,
                        optimizer=optimizer, save_interval_steps=save_every, schedule="constant",
                        grad_clip=grad_clip)
    parallel = ParallelConfig(num_workers=workers, tensor_parallel=tp, zero_stage=zero, precision="fp32")
    return RunSpec(
        model=model, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
        precision="fp32", grad_accum_steps=1,
        ds_config=make_ds_config(train, parallel, "fp32", 1, d_model=model.d_model),
        flops_per_token=1.0, config_fingerprint="test", math_config={}, tokenizer_sha256="", record_losses=True,
    )


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


def outcomes_of(spec):
    return run_distributed(train_and_report, spec.parallel.num_workers, spec)


def losses_of(outcome, steps=range(STEPS)) -> list[float]:
    return [outcome.losses[s] for s in steps]


def weights_of(spec):
    from pathlib import Path

    from pipeline.checkpoint.consolidate import consolidated_state_dict
    from pipeline.checkpoint.layout import checkpoint_root, latest_complete

    return consolidated_state_dict(latest_complete(checkpoint_root(Path(spec.run_dir))))


def assert_same_weights(ours, theirs, atol=1e-4):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=atol), name


def uninterrupted(data_dir, run_dir, model, **kw):
    """2 x STEPS steps on one rank, a checkpoint at STEPS and at the end."""
    spec = make_spec(data_dir, run_dir, model, steps=2 * STEPS, save_every=STEPS, **kw)
    (outcome,) = outcomes_of(spec)
    return spec, losses_of(outcome, range(2 * STEPS))


@pytest.fixture(scope="module")
def modern_reference(data_dir, tmp_path_factory):
    return uninterrupted(data_dir, tmp_path_factory.mktemp("modern"), MODERN)


@pytest.fixture(scope="module")
def alibi_reference(data_dir, tmp_path_factory):
    return uninterrupted(data_dir, tmp_path_factory.mktemp("alibi"), ALIBI)


def resumed_from_the_middle(data_dir, tmp_path, reference, model, **kw):
    """The reference resumed from its checkpoint at STEPS in another run directory: (losses of the steps after
    it, final weights)."""
    from pipeline.checkpoint.layout import checkpoint_root, find_tag

    ref_spec, _ = reference
    tag = find_tag(checkpoint_root(Path(ref_spec.run_dir)) / f"step_{STEPS:08d}")
    spec = dataclasses.replace(make_spec(data_dir, tmp_path, model, steps=2 * STEPS, **kw), resume_from=str(tag))
    return losses_of(outcomes_of(spec)[0], range(STEPS, 2 * STEPS)), weights_of(spec)


def check_learns_resumes_and_exports(data_dir, tmp_path, reference, model, architecture):
    from pipeline.evaluation.export import to_hf_model
    from pipeline.model.gpt import GPT

    ref_spec, losses = reference
    assert losses[-1] < losses[0] - 0.1
    # Resumed from the reference's checkpoint at STEPS: the same losses and weights as the run that never stopped.
    resumed_losses, weights = resumed_from_the_middle(data_dir, tmp_path, reference, model)
    assert resumed_losses == pytest.approx(losses[STEPS:], rel=1e-5)
    assert_same_weights(weights, weights_of(ref_spec), atol=1e-6)
    # The trained model exported: the same logits on a document (an EOS, then tokens without one).
    ours = GPT(model).eval()
    ours.load_state_dict(weights)
    hf = to_hf_model(model, weights)
    assert type(hf).__name__ == architecture
    ids = torch.cat([torch.tensor([[EOS]]), torch.randint(2, 64, (1, 15), generator=torch.Generator().manual_seed(0))], 1)
    with torch.no_grad():
        assert (ours(ids)[0] - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_modern_options_learn_resume_exactly_and_export(modern_reference, data_dir, tmp_path):
    check_learns_resumes_and_exports(data_dir, tmp_path, modern_reference, MODERN, "Qwen3ForCausalLM")


def test_alibi_model_learns_resumes_exactly_and_exports(alibi_reference, data_dir, tmp_path):
    check_learns_resumes_and_exports(data_dir, tmp_path, alibi_reference, ALIBI, "BloomForCausalLM")


@pytest.mark.parametrize("layout", [dict(workers=2, tp=2), dict(workers=2, micro=2, zero=3)], ids=["tp2", "zero3"])
def test_modern_options_train_the_same_under_tensor_parallelism_and_zero_3(modern_reference, data_dir, tmp_path, layout):
    """tp=2 splits the 4 query and 2 key/value heads (1 KV head per rank); QK-norm's weights, replicated,
    get the sum of both ranks' head gradients. ZeRO-3 builds the same (µP-initialised) model partitioned."""
    ref_spec, expected = modern_reference
    spec = make_spec(data_dir, tmp_path, MODERN, steps=2 * STEPS, **layout)
    assert losses_of(outcomes_of(spec)[0], range(2 * STEPS)) == pytest.approx(expected, rel=1e-5)
    assert_same_weights(weights_of(spec), weights_of(ref_spec))


def test_alibi_model_trains_the_same_under_zero_3(alibi_reference, data_dir, tmp_path):
    ref_spec, expected = alibi_reference
    spec = make_spec(data_dir, tmp_path, ALIBI, workers=2, micro=2, zero=3, steps=2 * STEPS)
    assert losses_of(outcomes_of(spec)[0], range(2 * STEPS)) == pytest.approx(expected, rel=1e-5)
    assert_same_weights(weights_of(spec), weights_of(ref_spec))


@pytest.fixture(scope="module")
def muon_reference(data_dir, tmp_path_factory):
    return uninterrupted(data_dir, tmp_path_factory.mktemp("muon"), PLAIN, optimizer="muon")


def test_muon_learns_and_differs_from_adamw(muon_reference, data_dir, tmp_path):
    spec, losses = muon_reference
    assert losses[-1] < losses[0] - 0.1
    adamw = losses_of(outcomes_of(make_spec(data_dir, tmp_path, PLAIN, steps=2 * STEPS))[0], range(2 * STEPS))
    assert abs(adamw[-1] - losses[-1]) > 1e-3  # another optimizer really ran


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_muon_under_zero_equals_zero_0(muon_reference, data_dir, tmp_path, zero):
    """DeepSpeed's ZeRO 1-2 orthogonalise each matrix's whole gradient, then partition the update; ZeRO-3
    (the model built partitioned under zero.Init) all-gathers each sub-group's gradients for it (without
    reduce-scatter, which DeepSpeed refuses with Muon: pipeline.train.ds_config)."""
    ref_spec, expected = muon_reference
    spec = make_spec(data_dir, tmp_path, PLAIN, workers=2, micro=2, zero=zero, optimizer="muon", steps=2 * STEPS)
    assert losses_of(outcomes_of(spec)[0], range(2 * STEPS)) == pytest.approx(expected, rel=1e-4)
    assert_same_weights(weights_of(spec), weights_of(ref_spec), atol=1e-3)


def first_updates(spec) -> dict[str, torch.Tensor]:
    """(decayed initial weight - weight after one step) / lr of each matrix: what the optimizer added."""
    from pipeline.model.gpt import GPT
    from pipeline.train.distributed import seed_everything

    outcomes_of(spec)
    seed_everything(spec.train.seed)
    initial = GPT(spec.model).state_dict()
    after = weights_of(spec)
    lr = spec.train.muon_lr if spec.train.optimizer == "muon" else spec.train.lr
    decay = spec.train.weight_decay
    return {name: (initial[name] * (1 - lr * decay) - after[name]) / lr for name in after
            if after[name].dim() == 2 and name.startswith("blocks.")}


def test_muon_under_zero_3_orthogonalises_every_hidden_matrix(data_dir, tmp_path):
    """Under ZeRO-3 (zero.Init on 2 ranks) each hidden matrix's first update is Muon's: the orthogonalised momentum
    (Newton-Schulz's quintic puts every singular value in about [0.68, 1.13] of one scale: measured max/median
    1.32-1.49), and the very update the ZeRO-0 Muon run makes. AdamW's first update, sign(gradient) elementwise,
    has singular values spread far wider (measured 3.0-7.2): were Muon silently replaced, this fails."""
    one_step = {"steps": 1, "save_every": 1}
    ours = first_updates(make_spec(data_dir, tmp_path / "z3", PLAIN, workers=2, micro=2, zero=3, optimizer="muon",
                                   **one_step))
    reference = first_updates(make_spec(data_dir, tmp_path / "z0", PLAIN, optimizer="muon", **one_step))
    adamw = first_updates(make_spec(data_dir, tmp_path / "adamw", PLAIN, workers=2, micro=2, zero=3, **one_step))
    assert len(ours) == 6 * PLAIN.n_layer  # q, k, v, o, up, down

    def spread(update: torch.Tensor) -> float:
        values = torch.linalg.svdvals(update)
        return (values.max() / values.median()).item()

    for name, update in ours.items():
        assert torch.allclose(update, reference[name], atol=1e-4), name
        assert spread(update) < 1.7, name
        assert spread(adamw[name]) > 2.5, name  # the check tells the two optimizers apart


def test_muon_resumes_exactly_from_its_momentum(muon_reference, data_dir, tmp_path):
    """The checkpoint at STEPS holds Muon's momentum buffers and Adam's moments: resumed, the same losses and
    weights as the run that never stopped."""
    ref_spec, expected = muon_reference
    losses, weights = resumed_from_the_middle(data_dir, tmp_path, muon_reference, PLAIN, optimizer="muon")
    assert losses == pytest.approx(expected[STEPS:], rel=1e-5)
    assert_same_weights(weights, weights_of(ref_spec), atol=1e-6)
