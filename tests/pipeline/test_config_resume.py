"""What a checkpoint records as its math (pipeline.config.resume_fields) follows each field's `resume` metadata, every
field has one, and the result is byte-identical to what older checkpoints recorded, so that they still resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from omegaconf import OmegaConf

from pipeline.compose import compose_node
from pipeline.config import RESUME_KINDS, ModelConfig, PipelineConfig, TrainConfig, resume_fields

# sha256 (first 16 hex digits) of json.dumps(resume_fields(...), sort_keys=True) for composed configs, computed
# with the hand-kept tuples the driver had before the metadata (_NOT_MATH, _LATER_TRAIN_OPTIONS, ...): checkpoints
# written since then record exactly these. A change here means older checkpoints of that config stop resuming
# (they would need train.allow_config_change): add a new field with `later(<the value runs had before it>)`.
OVERRIDES = {
    "default": [],
    **{f"model={m}": [f"model={m}"] for m in (
        "gpt2_large", "gpt2_medium", "gpt2_small", "gpt2_xl", "gpt3_125m", "gpt3_13b", "gpt3_175b", "gpt3_1_3b",
        "gpt3_2_7b", "gpt3_350m", "gpt3_6_7b", "gpt3_760m")},
    "muon": ["train.optimizer=muon"],
    "muon_lr": ["train.optimizer=muon", "train.muon_lr=0.01", "train.muon_momentum=0.9"],
    "constant": ["train.schedule=constant"],
    "wsd": ["train.schedule=wsd"],
    "later_model": ["model.n_kv_head=2", "model.embedding_norm=true", "model.rope_theta=5e5", "model.qk_norm=true",
                    "model.z_loss=1e-4", "model.mup_base_width=32", "model.pos_encoding=rotary", "model.norm=rmsnorm",
                    "model.activation=swiglu", "model.d_ff=null"],
    "no_doc_mask": ["model.document_mask=false"],
    "free_fields": ["model.attention_kernel=flex", "train.eval_interval_steps=7", "train.log_interval_steps=3",
                    "train.save_at_steps=[5,10]", "train.compile=true", "train.peak_tflops=12.5",
                    "train.max_failures=3"],
    "sweep": ["sweep=isoflop_tiny"],
}
RECORDED = {
    "default": "57edde3b3a43ae7c",
    "model=gpt2_large": "a005848ecc04a634",
    "model=gpt2_medium": "4d7b16100f057da2",
    "model=gpt2_small": "fb464e2411dbc6dc",
    "model=gpt2_xl": "bfb6ea439687961b",
    "model=gpt3_125m": "2a718395aa099b2d",
    "model=gpt3_13b": "48902a064d502d6b",
    "model=gpt3_175b": "26683f16f0979bee",
    "model=gpt3_1_3b": "987c6f7010313854",
    "model=gpt3_2_7b": "cbd68fce8e7bdf55",
    "model=gpt3_350m": "bdf9b8d56e42f32e",
    "model=gpt3_6_7b": "3a1b33eb46b76547",
    "model=gpt3_760m": "d17240dcc4b1eee4",
    "muon": "a307b94fbb37aae7",
    "muon_lr": "ab550c02fff7ef1e",
    "constant": "bc0fa6a330de09fe",
    "wsd": "73ab68e920ea4813",
    "later_model": "cf336bc92004fe3a",
    "no_doc_mask": "af2f18345ce12ae6",
    "free_fields": "57edde3b3a43ae7c",  # the same as the default: none of them is math
    "sweep": "402d293be7672bec",
}


def _resume_fields_of(overrides: list[str]) -> dict:
    """resume_fields of the composed config, its model given the data set's vocabulary and EOS id as the driver
    does (pipeline.model.size.model_for_data)."""
    from pipeline.model.size import model_for_data

    node = compose_node(overrides)
    OmegaConf.set_readonly(node, False)
    cfg = OmegaConf.to_object(node)
    return resume_fields(cfg.train, model_for_data(cfg.model, 4096, 3))


@pytest.mark.parametrize("label", sorted(RECORDED))
def test_resume_fields_are_what_older_checkpoints_recorded(label):
    blob = json.dumps(_resume_fields_of(OVERRIDES[label]), sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest()[:16] == RECORDED[label]


def test_the_default_runs_resume_fields_in_full():
    assert _resume_fields_of([]) == {
        "model": {"name": "tiny", "vocab_size": 4096, "context_length": 128, "n_layer": 4, "n_head": 4, "d_model": 128,
                  "d_ff": 512, "dropout": 0.0, "bias": True, "tie_embeddings": True, "pos_encoding": "learned",
                  "document_mask": True, "eos_id": 3, "norm": "layernorm", "activation": "gelu", "init_std": 0.02},
        "train": {"max_steps": 300, "micro_batch_size": 8, "global_batch_tokens": 4096, "lr": 0.003,
                  "min_lr_ratio": 0.1, "warmup_steps": 30, "schedule": "cosine", "decay_fraction": 0.2,
                  "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "seed": 1337},
    }


@pytest.mark.parametrize("section", [ModelConfig, TrainConfig])
def test_every_field_says_how_it_counts_for_resuming(section):
    """A field added without `resume` metadata fails here: decide whether it changes the numbers (MATH), not
    (FREE), or came after checkpoints existed (later(<the value runs had before it>))."""
    for spec in dataclasses.fields(section):
        kind = spec.metadata.get("resume")
        assert kind in RESUME_KINDS, f"{section.__name__}.{spec.name} has no resume metadata (MATH, FREE, later(...))"
        if kind == "later":
            assert "before" in spec.metadata, f"{section.__name__}.{spec.name}: later() needs the value runs had before"
    assert [s.name for s in dataclasses.fields(section) if s.metadata["resume"] == "length"] == (
        ["max_steps"] if section is TrainConfig else [])


def test_each_kind_counts_as_it_says():
    cfg = PipelineConfig()
    base = resume_fields(cfg.train, cfg.model)

    def with_train(**changes):
        return resume_fields(dataclasses.replace(cfg.train, **changes), cfg.model)

    assert with_train(lr=1e-3)["train"]["lr"] == 1e-3  # math
    assert with_train(log_interval_steps=1, save_at_steps=[3], resume="none") == base  # free
    assert "optimizer" not in base["train"] and with_train(optimizer="muon")["train"]["optimizer"] == "muon"  # later
    assert with_train(max_steps=10)["train"]["max_steps"] == 10  # length, under a schedule that stretches over it
    constant = with_train(schedule="constant")
    assert "max_steps" not in constant["train"] and with_train(schedule="constant", max_steps=10) == constant
    flex = dataclasses.replace(cfg.model, attention_kernel="flex")
    assert resume_fields(cfg.train, flex) == base  # free: the same attention whichever kernel computes it
    masked = dataclasses.replace(cfg.model, document_mask=True, eos_id=2)
    assert {k: v for k, v in resume_fields(cfg.train, masked)["model"].items() if k not in base["model"]} == {
        "document_mask": True, "eos_id": 2}
