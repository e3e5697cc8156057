"""The Hydra tree composes into the typed schema, and bad values stop with messages that name the fix."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.compose import compose_node
from pipeline.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    PipelineConfig,
    TrainConfig,
    grad_accumulation_steps,
    validate,
    validate_parallel,
    validate_train,
)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def compose_config(overrides: list[str]) -> PipelineConfig:
    return OmegaConf.to_object(compose_node(overrides))


def test_default_config_is_valid():
    cfg = compose_config([])
    validate(cfg)
    assert cfg.model.name == "tiny"
    assert cfg.data.source == "shakespeare"
    assert cfg.data.context_length == cfg.model.context_length
    assert cfg.run_name == "tiny-shakespeare"


def test_overrides_reach_nested_fields_and_interpolations():
    cfg = compose_config(["model.context_length=64", "train.max_steps=7", "parallel.zero_stage=3"])
    assert cfg.data.context_length == 64
    assert cfg.train.max_steps == 7
    assert cfg.parallel.zero_stage == 3


@pytest.mark.parametrize(
    "group,option",
    [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml"))],
)
def test_every_shipped_config_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "shakespeare":
        overrides.append(f"data.path={REPO / 'README.md'}")
    if (group, option) == ("data", "continued"):  # the recipe's new corpus is the user's to give
        overrides.append(f"data.mixture.0.path={REPO / 'README.md'}")
    cfg = compose_config(overrides)
    if group == "model":
        from pipeline.config import validate_model

        validate_model(cfg.model)
    if group == "sweep" and option != "none":
        from pipeline.config import validate_sweep
        from pipeline.scaling.sweep import plan_points

        validate(cfg)
        validate_sweep(cfg.sweep)
        points = plan_points(cfg, cfg.data.tokenizer.vocab_size)
        assert len({p.n_params for p in points}) >= 3  # at least three model sizes
        if cfg.sweep.kind == "isoflop":
            assert len(cfg.sweep.budgets_flops) >= 3
            assert all(p.compute == pytest.approx(p.budget, rel=0.05) for p in points)


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="nonsense"):
        compose_config(["nonsense=1"])


def test_appended_unknown_keys_are_refused_by_validation():
    """`+key=value` slips past Hydra's schema (it appends); validation names every stray key instead."""
    cfg = compose_config(["data=mixture", f"data.mixture.1.path={REPO / 'README.md'}", "+nonsense=1",
                          "+train.max_stepz=5", "+data.mixture.0.wieght=2"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for key in ("nonsense", "train.max_stepz", "data.mixture.0.wieght"):
        assert key in str(err.value)
    validate(compose_config(["train.max_steps=50"]))  # a known key is still fine


def test_wrong_type_is_refused():
    with pytest.raises(Exception, match="n_head"):
        compose_config(["model.n_head=abc"])


def test_heads_must_divide_width():
    cfg = compose_config(["model.n_head=5"])
    with pytest.raises(ConfigError, match=r"model\.d_model=128 is not divisible by model\.n_head=5"):
        validate(cfg)


def test_missing_data_path_is_named():
    cfg = compose_config(["data.path=/nonexistent"])
    with pytest.raises(ConfigError, match="data.path=/nonexistent does not exist"):
        validate(cfg)


def test_unknown_tokenize_engine_is_refused():
    # At composition (data.tokenize_engine is a Choice enum), and by validate for a config built in code.
    import pipeline.compose

    with pytest.raises(ConfigError, match="data.tokenize_engine='spark' is not one of auto, ray_data, actors"):
        pipeline.compose.compose_config(["data.tokenize_engine=spark"])
    cfg = compose_config([])
    cfg.data.tokenize_engine = "spark"
    with pytest.raises(ConfigError, match="data.tokenize_engine='spark' is not one of auto, ray_data, actors"):
        validate(cfg)


def test_tensor_parallel_checks():
    model = ModelConfig(n_head=4, d_model=128)
    with pytest.raises(ConfigError, match="does not divide model.n_head"):
        validate_parallel(ParallelConfig(num_workers=3, tensor_parallel=3), model)
    with pytest.raises(ConfigError, match="not divisible by parallel.tensor_parallel"):
        validate_parallel(ParallelConfig(num_workers=3, tensor_parallel=2), model)
    validate_parallel(ParallelConfig(num_workers=4, tensor_parallel=2), model)


def test_sequence_parallel_checks():
    model = ModelConfig(n_head=4, n_kv_head=2, d_model=128, context_length=96)
    with pytest.raises(ConfigError, match="sequence_parallel=4 does not divide model.n_kv_head=2"):
        validate_parallel(ParallelConfig(num_workers=4, sequence_parallel=4), model)
    with pytest.raises(ConfigError, match="sequence_parallel=3 does not divide model.n_head=4"):
        validate_parallel(ParallelConfig(num_workers=3, sequence_parallel=3), dataclasses.replace(model, n_kv_head=None))
    with pytest.raises(ConfigError, match="not divisible by parallel.sequence_parallel=2"):
        validate_parallel(ParallelConfig(num_workers=3, sequence_parallel=2), model)
    with pytest.raises(ConfigError, match="does not divide model.context_length=95"):
        validate_parallel(ParallelConfig(num_workers=2, sequence_parallel=2), dataclasses.replace(model, context_length=95))
    with pytest.raises(ConfigError, match="Ulysses groups .* have no tensor-parallel dimension"):
        validate_parallel(ParallelConfig(num_workers=4, sequence_parallel=2, tensor_parallel=2), model)
    with pytest.raises(ConfigError, match="train.compile=true with parallel.sequence_parallel > 1"):
        validate_train(TrainConfig(compile=True, micro_batch_size=1, global_batch_tokens=96),
                       ParallelConfig(num_workers=2, sequence_parallel=2), model)
    with pytest.raises(ConfigError, match="train.optimizer=muon with parallel.sequence_parallel > 1"):
        validate_train(TrainConfig(optimizer="muon", micro_batch_size=1, global_batch_tokens=96),
                       ParallelConfig(num_workers=2, sequence_parallel=2, zero_stage=1), model)
    parallel = ParallelConfig(num_workers=4, sequence_parallel=2)
    validate_parallel(parallel, model)
    # Two data-parallel replicas of two ranks each: the global batch is micro x 2 x context per step.
    train = TrainConfig(micro_batch_size=1, global_batch_tokens=4 * 96)
    validate_train(train, parallel, model)
    assert grad_accumulation_steps(train, parallel, 96) == 2


def test_workers_per_node_must_divide_the_workers():
    from pipeline.config import ClusterConfig, validate_placement
    from pipeline.train.ray_launch import worker_resources

    with pytest.raises(ConfigError, match=r"num_workers=6 is not a multiple of cluster.workers_per_node=4.*num_workers=8"):
        validate_placement(ClusterConfig(workers_per_node=4), ParallelConfig(num_workers=6))
    validate_placement(ClusterConfig(workers_per_node=4), ParallelConfig(num_workers=8))
    cfg = compose_config(["cluster.workers_per_node=3", "parallel.num_workers=4"])
    with pytest.raises(ConfigError, match="workers_per_node=3"):
        validate(cfg)
    assert worker_resources(ParallelConfig(use_gpu=True, gpus_per_worker=2, cpus_per_worker=8)) == {"CPU": 8, "GPU": 2}
    assert worker_resources(ParallelConfig(cpus_per_worker=2)) == {"CPU": 2}


def test_tensor_parallel_checks_the_swiglu_width():
    # SwiGLU's d_ff is 8/3 d_model rounded up to 64: 256 for d_model=96 (not 4 x 96 = 384, which 3 divides).
    swiglu = ModelConfig(n_head=3, d_model=96, activation="swiglu")
    with pytest.raises(ConfigError, match="does not divide model.d_ff=256"):
        validate_parallel(ParallelConfig(num_workers=3, tensor_parallel=3), swiglu)
    validate_parallel(ParallelConfig(num_workers=3, tensor_parallel=3), dataclasses.replace(swiglu, activation="gelu"))


def test_global_batch_must_divide_evenly():
    model = ModelConfig(context_length=128)
    parallel = ParallelConfig(num_workers=2)
    with pytest.raises(ConfigError, match="multiple of 2048"):
        validate_train(TrainConfig(micro_batch_size=8, global_batch_tokens=3000), parallel, model)
    train = TrainConfig(micro_batch_size=8, global_batch_tokens=8192)
    validate_train(train, parallel, model)
    assert grad_accumulation_steps(train, parallel, 128) == 4


def test_fp16_on_cpu_is_refused_before_workers_start():
    from pipeline.train.ds_config import resolve_precision

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision(ParallelConfig(precision="fp16", use_gpu=False))


def test_cli_reports_bad_values_fast_and_writes_nothing(tmp_path):
    for override, expected in [
        ("model.n_head=5", "not divisible by model.n_head=5"),
        ("data.path=/nonexistent", "data.path=/nonexistent does not exist"),
        ("nonsense=1", "nonsense"),
        ("+nonsense=1", "unknown config key(s) nonsense"),
    ]:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", override, f"output_dir={tmp_path / 'out'}"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert proc.returncode != 0
        assert expected in proc.stderr
        assert time.monotonic() - started < 10, f"{override} took over 10 s to be refused"
    assert list(tmp_path.iterdir()) == []


# One source of defaults: the schema's dataclasses (pipeline.config). A YAML file of conf/ sets only what its option
# chooses, and these are the keys each group's options may set (any other key would be a default restated in YAML,
# or a default hiding there: give the dataclass field that value instead).
OPTION_KEYS = {
    # A model option is an architecture: its sizes and the choices that define it (GPT-2 keeps learned positions and
    # LayerNorm whatever the schema's defaults become).
    "model": {"name", "vocab_size", "context_length", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "dropout",
              "bias", "tie_embeddings", "pos_encoding", "embedding_norm", "rope_theta", "document_mask", "qk_norm",
              "norm", "activation", "init_std"},
    # A data option is a corpus: where it is, how it splits into documents, its vocabulary.
    "data": {"name", "source", "path", "text_field", "doc_split", "hf_config", "hf_revision", "hf_split", "mixture",
             "context_length", "tokenizer"},
    # A parallel option is a hardware layout.
    "parallel": {"num_workers", "tensor_parallel", "zero_stage", "precision", "use_gpu", "gpus_per_worker",
                 "cpus_per_worker"},
    # A cluster option is where Ray runs: every field of it.
    "cluster": {"name", "address", "num_cpus", "placement_strategy", "workers_per_node", "connect_timeout_s",
                "runtime_env_working_dir", "shared_storage", "storage_uri"},
    # A train option is a recipe: its schedule (train=continued re-warms and decays); see SHIPPED_CHOICES.
    "train": {"eval_interval_steps", "lr", "schedule", "decay_fraction", "min_lr_ratio", "warmup_steps"},
    "eval": set(),
    "tracking": set(),
    # A sweep (@package _global_) pins what its runs need, so that its results do not move with the defaults.
    "sweep": {"sweep", "model.context_length", "data.tokenizer.vocab_size", "train.micro_batch_size",
              "train.global_batch_tokens", "train.lr", "train.save_interval_steps", "eval.max_tokens",
              "eval.num_samples"},
}
# Where the default composition (conf/config.yaml's defaults list) differs from PipelineConfig() on purpose.
SHIPPED_CHOICES = {
    # model=tiny spells out its MLP width (4 * d_model, what null computes): the value is in its runs' recorded
    # config and resume fingerprint.
    "model.d_ff": 512,
    # Every shipped model masks attention at document boundaries; a ModelConfig built in code has no EOS id to mask
    # with (GPT refuses document_mask without model.eos_id), so the schema's default stays off.
    "model.document_mask": True,
    # The shipped run validates every 100 steps; a TrainConfig built in code (tests and benchmarks train on synthetic
    # data sets whose placeholder tokenizer cannot score bits per byte) validates only when asked.
    "train.eval_interval_steps": 100,
}
# Every data option sets data.context_length: ${model.context_length} (windows follow the model); an interpolation
# that a DataConfig built in code could not hold.
INTERPOLATED = {"data.context_length": "${model.context_length}"}


def _leaves(node, prefix: str = "") -> dict:
    """{"a.b": value} of the dict leaves below node (a list is a leaf)."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _option_files() -> dict[str, list[Path]]:
    return {g.name: sorted(g.glob("*.yaml")) for g in sorted(CONF.iterdir()) if g.is_dir() and g.name != "hydra"
            and list(g.glob("*.yaml"))}


def _option_leaves(group: str, path: Path) -> dict:
    """The dotted keys (from the config's root) and values that one option file sets."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    return _leaves(node if group == "sweep" else {group: node})


def _schema_defaults() -> dict:
    from pipeline.config import resolved_run_name

    expected = PipelineConfig()
    expected.run_name = resolved_run_name(expected)
    expected.data.output_dir = f"{expected.output_dir}/data"
    return _leaves(dataclasses.asdict(expected))


def test_the_default_composition_is_the_schema_defaults_but_the_shipped_choices():
    composed = _leaves(dataclasses.asdict(compose_config([])))
    defaults = _schema_defaults()
    assert composed.keys() == defaults.keys()
    differing = {key: value for key, value in composed.items() if value != defaults[key]}
    assert differing == SHIPPED_CHOICES, "a YAML default and its dataclass default disagree: give the dataclass field " \
        "the value (the one source of defaults), or list the key in SHIPPED_CHOICES with the reason"


def test_yaml_files_set_only_their_options_keys():
    root = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"), resolve=False)
    assert set(root) <= {"defaults", "hydra"}, "conf/config.yaml sets a default: give PipelineConfig's field the value"
    for group, paths in _option_files().items():
        allowed = {key if group == "sweep" else f"{group}.{key}" for key in OPTION_KEYS[group]}
        for path in paths:
            stray = [key for key in _option_leaves(group, path)
                     if not any(key == a or key.startswith(f"{a}.") for a in allowed)]
            assert not stray, f"{path.relative_to(REPO)} sets {stray}: a default belongs in the dataclass " \
                              f"(pipeline.config); an option's own choice, in OPTION_KEYS[{group!r}]"


def test_a_value_every_option_of_a_group_sets_is_a_shipped_choice():
    """A key that every option of a group sets to one value other than the dataclass default is a default in
    disguise (document_mask: true in all of conf/model/): it must be one of the deliberate SHIPPED_CHOICES."""
    defaults = _schema_defaults()
    for group, paths in _option_files().items():
        if len(paths) < 2 or group == "sweep":
            continue
        options = [_option_leaves(group, path) for path in paths]
        for key, value in options[0].items():
            if key in defaults and value != defaults[key] and all(o.get(key, defaults[key]) == value for o in options):
                assert SHIPPED_CHOICES.get(key, INTERPOLATED.get(key)) == value, \
                    f"every conf/{group}/ option sets {key}={value!r} against the dataclass default {defaults[key]!r}"


def test_stage_level_config_errors_print_cleanly(tmp_path):
    """fp16 on a CPU is caught before any worker starts, with the fix in the message and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "parallel.precision=fp16", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "fp16 needs a GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
