"""model.init_from: Hugging Face checkpoints built by transformers itself (small, random, no downloads) as the
GPT's initial weights. For every architecture the exporter writes, the imported GPT's logits equal transformers'
and an export of it gives back every tensor exactly; the weights load partitioned under ZeRO-3 and sliced under
tensor parallelism, where the first training step's loss is transformers' loss on the same windows; what the GPT
cannot be, or what a checkpoint must not do, is refused naming the setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import run_distributed

from pipeline.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from pipeline.config.hf_shape import with_checkpoint_shape
from pipeline.containment import ContainmentError
from pipeline.model.gpt import GPT
from pipeline.model.hf_import import load_imported_weights

VOCAB, CONTEXT = 96, 16


def tiny_hf(kind: str, scale: float = 1.0):
    """A random transformers model of the architecture `kind` (fp32), its matrices multiplied by scale."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "llama":  # grouped-query attention, Llama 3's theta and epsilon, untied head
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen3":
        config = tf.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                tie_word_embeddings=True)
        model = tf.Qwen3ForCausalLM(config)
    else:
        config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                attention_dropout=0.0)
        model = tf.BloomForCausalLM(config)
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: move them, so a swap would show
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(scale)
    return model.eval()


def imported(directory, **overrides) -> GPT:
    cfg = with_checkpoint_shape(ModelConfig(init_from=str(directory), context_length=CONTEXT, **overrides))
    model = GPT(cfg, init_weights=False)
    load_imported_weights(model, directory)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3", "bloom"])
def test_an_imported_checkpoint_gives_transformers_logits_and_exports_back_exactly(tmp_path, kind):
    from pipeline.evaluation.export import hf_weights

    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / kind)
    ours = imported(tmp_path / kind)
    ids = torch.randint(0, VOCAB, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, _ = hf(input_ids=ids).logits, None
        logits, _ = ours(ids)
    assert (logits - theirs).abs().max().item() < 1e-4
    # The round trip import -> export gives back every tensor of the checkpoint, bit for bit.
    _, _, exported = hf_weights(ours.cfg, ours.state_dict())
    original = hf.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name


def test_the_hubs_gpt2_names_without_the_transformer_prefix_load_too(tmp_path):
    """The Hub's GPT-2 and BLOOM files name their tensors without `transformer.` (wte.weight, h.0.attn.c_attn...):
    they import to the same model as save_pretrained's names."""
    from safetensors.torch import save_file

    hf = tiny_hf("gpt2")
    hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_bytes((tmp_path / "saved" / "config.json").read_bytes())
    hub_names = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
                 if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    save_file(hub_names, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(imported(tmp_path / "hub")(ids)[0], imported(tmp_path / "saved")(ids)[0])


def test_the_checkpoint_sets_the_shape_and_the_context_stays_the_runs(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "llama")
    cfg = with_checkpoint_shape(ModelConfig(init_from=str(tmp_path / "llama"), context_length=CONTEXT))
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff, cfg.vocab_size) == (2, 4, 2, 32, 64, VOCAB)
    assert (cfg.pos_encoding, cfg.norm, cfg.activation, cfg.rope_theta, cfg.norm_eps) == (
        "rotary", "rmsnorm", "swiglu", 500000.0, 1e-5)
    assert cfg.context_length == CONTEXT and not cfg.tie_embeddings and not cfg.bias
    with pytest.raises(ConfigError, match="longer than model.init_from's checkpoint was made for \\(64 positions\\)"):
        with_checkpoint_shape(ModelConfig(init_from=str(tmp_path / "llama"), context_length=128))


def test_what_the_gpt_cannot_be_or_a_checkpoint_must_not_do_is_refused(tmp_path):
    import transformers as tf
    from safetensors.torch import save_file

    mistral = tmp_path / "mistral"
    tf.MistralForCausalLM(tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
                          ).save_pretrained(mistral)
    with pytest.raises(ConfigError, match="sliding-window attention"):
        with_checkpoint_shape(ModelConfig(init_from=str(mistral), context_length=CONTEXT))
    # Pickled weights are never loaded: they can run code.
    pickled = tmp_path / "pickled"
    tiny_hf("gpt2").save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(tiny_hf("gpt2").state_dict(), pickled / "pytorch_model.bin")  # what older checkpoints ship
    with pytest.raises(ConfigError, match="pytorch_model.bin are pickles, which can run code"):
        imported(pickled)
    # A tensor whose shape disagrees with config.json, and an index naming a file outside the directory.
    llama = tmp_path / "llama"
    tiny_hf("llama").save_pretrained(llama)
    state = {k: v.contiguous() for k, v in tiny_hf("llama").state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(state, llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.layers.1.mlp.up_proj.weight has shape \(65, 32\), its config.json "
                                          r"implies \(64, 32\)"):
        imported(llama)
    (llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../x"}}))
    with pytest.raises(ContainmentError, match="would lie outside"):
        imported(llama)
    with pytest.raises(ConfigError, match="model.mup_base_width=32 with model.init_from"):
        with_checkpoint_shape(ModelConfig(init_from=str(llama), context_length=CONTEXT, mup_base_width=32))
    (llama / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 5}))
    with pytest.raises(ConfigError, match="model_type='t5'; this pipeline imports gpt2, llama"):
        with_checkpoint_shape(ModelConfig(init_from=str(llama)))


@pytest.fixture(scope="module")
def windows_dir(tmp_path_factory):
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    windows = rng.integers(0, VOCAB, size=(6, CONTEXT + 1))  # 2 validation, 4 training windows: one global batch
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), windows, vocab_size=VOCAB, val_windows=2)


def train_and_report(spec):
    from pipeline.train.worker import train_worker

    return train_worker(spec)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(zero=3), dict(zero=1, tp=2), dict(zero=3, tp=2, workers=4)],
                         ids=["zero3-dp2", "tp2", "tp2xdp2-zero3"])
def test_the_first_step_at_zero_3_or_tensor_parallel_scores_transformers_loss(tmp_path, windows_dir, layout):
    """The ranks start from the checkpoint (under ZeRO-3 the first rank of each partition group reads one tensor at
    a time into the gathered parameter; under tensor parallelism AutoTP slices what each rank read; both at once on
    4 ranks): the loss of step 0, before any update, is transformers' loss on the same four windows (document
    masking off: with it positions restart at each EOS, which transformers' model does not do); the run then
    trains."""
    import torch.nn.functional as F

    from data_prep.blend import open_split
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec

    hf = tiny_hf("llama", scale=8.0)  # far from a fresh GPT's loss of ~ln(vocabulary)
    hf.save_pretrained(tmp_path / "llama")
    model = with_checkpoint_shape(ModelConfig(init_from=str(tmp_path / "llama"), context_length=CONTEXT))
    tp, workers = layout.get("tp", 1), layout.get("workers", 2)
    train = TrainConfig(max_steps=3, micro_batch_size=4 * tp // workers, warmup_steps=1, lr=1e-2, resume="none",
                        global_batch_tokens=4 * CONTEXT, log_interval_steps=1, peak_tflops=1.0)
    parallel = ParallelConfig(num_workers=workers, tensor_parallel=tp, zero_stage=layout["zero"], precision="fp32")
    spec = RunSpec(model=model, train=train, parallel=parallel, data_dir=str(windows_dir), run_dir=str(tmp_path / "run"),
                   precision="fp32", grad_accum_steps=1, ds_config=make_ds_config(train, parallel, "fp32", 1),
                   flops_per_token=1.0, config_fingerprint="t", math_config={}, tokenizer_sha256="", record_losses=True)
    outcome = run_distributed(train_and_report, workers, spec)[0]
    windows = torch.from_numpy(open_split(windows_dir, "train").windows(np.arange(4)).astype(np.int64))
    with torch.no_grad():
        logits = hf(input_ids=windows[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()
    assert abs(expected - math.log(VOCAB)) > 0.2
    assert outcome.losses[0] == pytest.approx(expected, rel=1e-5)
    assert outcome.losses[2] < outcome.losses[0]


@pytest.mark.distributed
def test_a_resumed_run_continues_from_its_checkpoint_not_from_the_directory_again(tmp_path, windows_dir):
    """ZeRO-3, 2 ranks: 4 steps from a checkpoint directory in one go, and 2 steps, a stop and a resume after the
    directory's weights changed: the resumed steps' losses are the uninterrupted run's (the resume reads its own
    checkpoint, not model.init_from)."""
    import dataclasses
    import shutil

    from pipeline.checkpoint.layout import checkpoint_root
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec

    tiny_hf("llama", scale=8.0).save_pretrained(tmp_path / "llama")
    model = with_checkpoint_shape(ModelConfig(init_from=str(tmp_path / "llama"), context_length=CONTEXT))
    train = TrainConfig(max_steps=4, micro_batch_size=2, warmup_steps=1, lr=1e-2, resume="none", save_interval_steps=2,
                        keep_last_checkpoints=0, global_batch_tokens=4 * CONTEXT, log_interval_steps=1, peak_tflops=1.0)
    parallel = ParallelConfig(num_workers=2, zero_stage=3, precision="fp32")
    full = RunSpec(model=model, train=train, parallel=parallel, data_dir=str(windows_dir), run_dir=str(tmp_path / "full"),
                   precision="fp32", grad_accum_steps=1, ds_config=make_ds_config(train, parallel, "fp32", 1),
                   flops_per_token=1.0, config_fingerprint="t", math_config={}, tokenizer_sha256="", record_losses=True)
    full_losses = run_distributed(train_and_report, 2, full)[0].losses
    tiny_hf("llama", scale=0.5).save_pretrained(tmp_path / "llama")  # other weights where the run started from
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(checkpoint_root(tmp_path / "full") / "step_00000002", resumed_dir / "step_00000002")
    (resumed_dir / "latest").write_text("step_00000002")
    resumed = dataclasses.replace(full, run_dir=str(tmp_path / "resumed"), resume_from=str(resumed_dir / "step_00000002"))
    outcome = run_distributed(train_and_report, 2, resumed)[0]
    assert sorted(outcome.losses) == [2, 3]
    assert [outcome.losses[s] for s in (2, 3)] == [full_losses[s] for s in (2, 3)]


def test_model_fields_are_what_export_writes(tmp_path):
    """Import reads exactly the settings export writes: an exported random GPT of each architecture imports to the
    same model config."""
    from pipeline.evaluation.export import to_hf_model

    for cfg in (ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layer=1, n_head=4, d_model=32, d_ff=64,
                            tie_embeddings=False),
                ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                            d_ff=64, pos_encoding="rotary", norm="rmsnorm", activation="swiglu", bias=False,
                            qk_norm=True, rope_theta=1e6)):
        to_hf_model(cfg, GPT(cfg).state_dict()).save_pretrained(tmp_path / cfg.pos_encoding)
        back = with_checkpoint_shape(ModelConfig(init_from=str(tmp_path / cfg.pos_encoding), context_length=CONTEXT))
        for field in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "bias", "tie_embeddings", "pos_encoding",
                      "norm", "activation", "qk_norm", "rope_theta", "vocab_size"):
            assert getattr(back, field) == getattr(cfg, field), field


def test_the_command_line_takes_the_checkpoints_shape_and_refuses_an_override_that_disagrees(tmp_path):
    import subprocess
    import sys

    tiny_hf("llama").save_pretrained(tmp_path / "llama")
    run = [sys.executable, "-m", "pipeline.cli"]
    params = subprocess.run([*run, "params", f"model.init_from={tmp_path / 'llama'}", "model.context_length=16"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert params.returncode == 0, params.stderr[-3000:]
    expected = sum(p.numel() for p in tiny_hf("llama").parameters())
    assert f"{expected:,}" in params.stdout
    refused = subprocess.run([*run, "train", f"model.init_from={tmp_path / 'llama'}", "model.n_layer=3",
                              f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
    assert refused.returncode == 2
    assert "model.n_layer=3 disagrees with model.init_from" in refused.stderr
    assert "config.json sets n_layer=2" in refused.stderr


@pytest.mark.distributed
def test_continued_pretraining_from_a_checkpoint_through_the_pipeline_and_export_back(tmp_path):
    """The continued-pretraining recipe (train=continued data=continued: a new corpus with 5% Shakespeare replayed,
    tokenized with the checkpoint's own tokenizer) from a GPT-2 at ZeRO-3, then pipeline export: plain
    transformers loads the export, with the same tokenizer, and the weights continued from the checkpoint's."""
    import subprocess
    import sys

    import transformers as tf
    from hf_tokenizers import gpt2_style

    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "gpt2")
    gpt2_style(tmp_path / "gpt2", vocab_size=512)
    new_corpus = Path(__file__).resolve().parents[2] / "README.md"
    common = [f"model.init_from={tmp_path / 'gpt2'}", "model.context_length=64", "train=continued", "data=continued",
              f"data.mixture.0.path={new_corpus}", "data.mixture.0.doc_split=blank_line",  # many documents, both splits
              f"output_dir={tmp_path / 'out'}", "train.max_steps=4", "train.warmup_steps=1", "train.micro_batch_size=4",
              "train.global_batch_tokens=512", "parallel.num_workers=2", "parallel.zero_stage=3",
              "parallel.precision=fp32", "train.log_interval_steps=1"]
    run = [sys.executable, "-m", "pipeline.cli"]
    train = subprocess.run([*run, "train", *common], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "another tokenizer" not in train.stdout + train.stderr
    blend = json.loads(next((tmp_path / "out" / "data").glob("continued-*/blend.json")).read_text())
    assert blend["tokenizer_file"] == "tokenizer.json" and [c["share"] for c in blend["components"]] == [0.95, 0.05]
    export = subprocess.run([*run, "export", *common, f"eval.export_dir={tmp_path / 'hf'}"], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(back, tf.GPT2LMHeadModel) and back.config.n_layer == 2 and back.config.n_embd == 32
    text = "To be, or not to be, that is the question:\n"
    exported, original = (tf.AutoTokenizer.from_pretrained(tmp_path / d) for d in ("hf", "gpt2"))
    assert exported(text)["input_ids"] == original(text)["input_ids"] and exported.eos_token == "<|endoftext|>"
    trained = {k: v for k, v in back.state_dict().items() if k.endswith("c_attn.weight")}
    start = {k: v for k, v in tf.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").state_dict().items()
             if k.endswith("c_attn.weight")}
    moved = [k for k in start if not torch.equal(start[k], trained[k])]
    assert moved and all((start[k] - trained[k]).abs().max() < 0.1 for k in start)  # continued, not restarted


def test_a_hub_id_is_fetched_once_into_the_output_directory_or_its_absence_explained(tmp_path, monkeypatch):
    """model.init_from=<org/name>: no Hub here (offline, or an id that does not exist), so the error says how to
    bring the directory in; one fetched before (<output_dir>/hub/<org>--<name>, complete) is read without the Hub."""
    from pipeline.compose import compose_config
    from pipeline.hub import COMPLETE, HubError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = ["model.init_from=pipeline-tests/tiny-llama", f"output_dir={tmp_path / 'out'}", f"model.context_length={CONTEXT}"]
    with pytest.raises(HubError, match=r"model.init_from=pipeline-tests/tiny-llama is not a local directory, and the "
                                       r"Hugging Face Hub did not give it .*hf download pipeline-tests/tiny-llama"):
        compose_config(args, stage="train")
    target = tmp_path / "out" / "hub" / "pipeline-tests--tiny-llama"
    tiny_hf("llama").save_pretrained(target)
    (target / COMPLETE).write_text("pipeline-tests/tiny-llama@main\n")
    cfg = compose_config(args, stage="train")
    assert cfg.model.init_from == str(target) and cfg.model.n_kv_head == 2 and cfg.model.vocab_size == VOCAB
    # A directory that exists is a directory, whatever its name looks like.
    (tmp_path / "pipeline-tests" / "tiny-llama").mkdir(parents=True)
    tiny_hf("gpt2").save_pretrained(tmp_path / "pipeline-tests" / "tiny-llama")
    assert compose_config(args, stage="train").model.pos_encoding == "learned"
