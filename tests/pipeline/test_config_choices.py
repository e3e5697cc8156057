"""Fixed-choice fields (train.schedule, parallel.precision, ...) are pipeline.config.Choice enums: a value outside
their choices stops at composition, naming the field and the values it takes, and a member behaves exactly like its
string wherever the pipeline uses the value (comparisons, dict keys, str and f-strings, json, pickling)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import typing

import pytest

from pipeline.compose import compose_config
from pipeline.config import (
    Choice,
    ConfigError,
    ParallelConfig,
    PipelineConfig,
    Precision,
    Schedule,
    TrainConfig,
    fingerprint,
    flatten,
    resume_fields,
    validate,
)

# Every field whose value is one of a fixed set of strings, and its choices.
CHOICE_FIELDS = {
    "model.pos_encoding": ("learned", "sinusoidal", "rotary", "alibi"),
    "model.attention_kernel": ("auto", "sdpa", "flex"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.activation": ("gelu", "swiglu"),
    "data.source": ("shakespeare", "text", "jsonl", "parquet", "hf_disk", "hf_hub", "mixture"),
    "data.doc_split": ("file", "line", "blank_line"),
    "data.on_binary": ("skip", "error"),
    "data.on_outside_link": ("skip", "error"),
    "data.tokenize_engine": ("auto", "ray_data", "actors"),
    "data.on_decode_error": ("replace", "skip"),
    "data.tokenizer.type": ("bpe", "unigram"),
    "data.mixture.source": ("shakespeare", "text", "jsonl", "parquet", "hf_disk", "hf_hub"),
    "data.mixture.doc_split": ("file", "line", "blank_line"),
    "parallel.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.optimizer": ("adamw", "muon"),
    "eval.export_dtype": ("fp32", "bf16"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "sweep.kind": ("isoflop", "grid", "points"),
}


def _choice_fields(cls: type = PipelineConfig, prefix: str = "") -> dict[str, type[Choice]]:
    """{"train.schedule": Schedule, ...}: the Choice-typed fields of the schema (a list of dataclasses by its name)."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if isinstance(inner, type) and issubclass(inner, Choice):
            found[f"{prefix}{name}"] = inner
        elif dataclasses.is_dataclass(inner):
            found |= _choice_fields(inner, f"{prefix}{name}.")
    return found


def test_every_fixed_choice_field_is_a_choice_enum():
    fields = _choice_fields()
    assert {key: enum.values() for key, enum in fields.items()} == CHOICE_FIELDS


@pytest.mark.parametrize("key", sorted(CHOICE_FIELDS))
def test_members_are_named_as_their_values_and_behave_as_them(key):
    enum = _choice_fields()[key]
    for member in enum:
        value = member.value
        assert member.name == value and type(value) is str
        assert str(member) == f"{member}" == "%s" % member == format(member, "") == value  # noqa: UP031 (log lines)
        assert type(str(member)) is str and f"{member:>12}" == f"{value:>12}"
        assert member == value and hash(member) == hash(value) and {value: 1}[member] == 1 and member in (value,)
        assert json.dumps({"k": member}) == json.dumps({"k": value})
        assert pickle.loads(pickle.dumps(member)) is member
        assert enum[value] is member and enum(value) is member


@pytest.mark.parametrize("override, key, allowed", [
    ("train.schedule=bogus", "train.schedule", "cosine, wsd, constant"),
    ("parallel.precision=fp8", "parallel.precision", "auto, bf16, fp16, fp32"),
    ("model.norm=batchnorm", "model.norm", "layernorm, rmsnorm"),
    ("cluster.placement_strategy=pack", "cluster.placement_strategy", "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    ("data.on_binary=ignore", "data.on_binary", "skip, error"),
])
def test_a_value_outside_the_choices_stops_at_composition(override, key, allowed):
    with pytest.raises(ConfigError) as caught:
        compose_config([override], stage="params")
    message = str(caught.value)
    assert f"{key}='{override.split('=')[1]}' is not one of {allowed}" in message and "\n" not in message


def test_a_mixture_source_cannot_itself_be_a_mixture():
    with pytest.raises(ConfigError, match=r"data\.mixture\[0\]\.source='mixture' is not one of shakespeare, text"):
        compose_config(["data=mixture", "data.mixture.0.source=mixture"], stage="params")


def test_the_cli_reports_a_value_outside_the_choices_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "params", "train.schedule=bogus"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: the overrides do not compose: train.schedule='bogus' is not one of cosine, wsd, constant: set "
        "train.schedule to one of them."]
    assert list(tmp_path.iterdir()) == []


def test_configs_built_in_code_with_plain_strings_work_as_the_composed_ones():
    composed = compose_config(["train.schedule=wsd", "parallel.precision=fp32"], stage="params")
    assert composed.train.schedule is Schedule.wsd and composed.parallel.precision is Precision.fp32
    plain = PipelineConfig(train=TrainConfig(schedule="wsd"), parallel=ParallelConfig(precision="fp32"))
    plain.model = composed.model
    plain.train.eval_interval_steps = composed.train.eval_interval_steps
    plain.output_dir, plain.data.output_dir = composed.output_dir, composed.data.output_dir
    plain.run_name = composed.run_name
    validate(plain)
    assert flatten(plain) == flatten(composed)
    assert fingerprint(plain) == fingerprint(composed)
    assert json.dumps(resume_fields(plain.train, plain.model)) == json.dumps(resume_fields(composed.train,
                                                                                          composed.model))


def test_validate_still_refuses_a_plain_string_outside_the_choices():
    cfg = compose_config([], stage="params")
    cfg.train.schedule = "linear"
    with pytest.raises(ConfigError, match="train.schedule='linear' is not one of cosine, wsd, constant"):
        validate(cfg)


def test_the_resolved_precision_is_a_plain_string():
    from pipeline.train.ds_config import make_ds_config, resolve_precision

    cfg = compose_config(["parallel.precision=fp32"], stage="params")
    precision = resolve_precision(cfg.parallel)
    assert type(precision) is str and precision == "fp32"
    json.dumps(make_ds_config(cfg.train, cfg.parallel, precision, 1))


def test_what_a_checkpoint_records_of_the_config_is_plain_data(tmp_path):
    """The math config goes into every checkpoint (DeepSpeed pickles its client state), and loading refuses any
    class that neither the pipeline's checkpoints nor DeepSpeed's hold: a Choice must be recorded as its string."""
    import torch

    from pipeline.checkpoint.layout import CheckpointError
    from pipeline.checkpoint.pickles import check_pickles

    cfg = compose_config(["train.schedule=wsd", "model=gpt2_small"], stage="params")
    recorded = resume_fields(cfg.train, cfg.model)
    leaves = [v for section in recorded.values() for v in section.values()]
    assert "wsd" in leaves and all(type(v) in (str, int, float, bool, list, type(None)) for v in leaves), leaves
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"module": {}, "math_config": recorded}, tag / "mp_rank_00_model_states.pt")
    check_pickles(tag)  # raises CheckpointError naming any foreign class
    torch.save({"module": {}, "math_config": {"schedule": cfg.train.schedule}}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="Schedule"):
        check_pickles(tag)
