"""Typed configuration of every stage, validated before any stage works: one module per section, each holding its
dataclass and its own checks.

    base       ConfigError, Choice (the str Enum of fixed-choice fields), the `resume` metadata of fields, the checks
    model      model.*      ModelConfig, validate_model, the widths derived from it (kv_heads, mlp_width, ...)
    data       data.*       DataConfig, SourceConfig, TokenizerConfig, validate_data
    parallel   parallel.*   ParallelConfig, validate_parallel
    deepspeed  parallel.deepspeed: what the expert DeepSpeed passthrough may hold (validate_deepspeed)
    train      train.*      TrainConfig, validate_train, the schedule's and the batch's arithmetic
    eval       eval.*       EvalConfig, validate_eval
    cluster    cluster.*, tracking.*   ClusterConfig, TrackingConfig, their checks and the workers' placement
    sweep      sweep.*      SweepConfig, SweepRun, validate_sweep
    resume     resume_fields: what a checkpoint records as its math, by the fields' `resume` metadata
    root       PipelineConfig, validate, validate_for_submit, run names and directory, fingerprint, flatten

The dataclasses are the schema of the Hydra tree in ``conf/`` and the one source of its defaults: Hydra composes
the YAML files into them (pipeline.compose), so a misspelt key or a value of the wrong type stops at composition.
Cross-field rules that types cannot express live in :func:`validate`, which every stage runs before it starts any
expensive work. Each error names the field, the value and the fix. Import from here (``from pipeline.config import
X``); this package imports nothing above pipeline.errors, pipeline.containment and pipeline.redaction.
"""

from omegaconf import MISSING  # re-exported for YAML schemas

from pipeline.config.base import (  # PipelineError: every error class derives from it
    FREE,
    LENGTH,
    MATH,
    RESUME_KINDS,
    Choice,
    ConfigError,
    PipelineError,
    later,
    validate_finite,
)
from pipeline.config.cluster import (
    ClusterConfig,
    PlacementStrategy,
    TrackingConfig,
    validate_cluster,
    validate_placement,
    validate_tracking,
)
from pipeline.config.data import (
    DOC_SPLITS,
    SOURCES,
    TOKENIZE_ENGINES,
    DataConfig,
    DataSource,
    DocSplit,
    OnBinary,
    OnDecodeError,
    OnOutsideLink,
    Source,
    SourceConfig,
    TokenizeEngine,
    TokenizerConfig,
    TokenizerType,
    validate_data,
)
from pipeline.config.deepspeed import (
    DEEPSPEED_OWNED,
    DEEPSPEED_PATH_KEY,
    DEEPSPEED_UNRECORDED,
    DEEPSPEED_USER_PATHS,
    DEEPSPEED_WRITERS,
    validate_deepspeed,
)
from pipeline.config.eval import (
    EXPORT_DTYPES,
    EvalConfig,
    ExportDtype,
    validate_eval,
)
from pipeline.config.model import (
    ACTIVATIONS,
    NORMS,
    POS_ENCODINGS,
    Activation,
    AttentionKernel,
    ModelConfig,
    Norm,
    PosEncoding,
    kv_heads,
    mlp_width,
    norm_epsilon,
    validate_model,
    width_multiplier,
)
from pipeline.config.parallel import (
    PRECISIONS,
    ParallelConfig,
    Precision,
    data_parallel_size,
    replica_size,
    validate_parallel,
)
from pipeline.config.resume import (
    resume_fields,
)
from pipeline.config.root import (
    PipelineConfig,
    fingerprint,
    flatten,
    resolved_run_name,
    run_dir_for,
    unknown_keys,
    validate,
    validate_for_submit,
    validate_known_keys,
    validate_names,
)
from pipeline.config.sweep import (
    SweepConfig,
    SweepKind,
    SweepRun,
    sweep_size,
    validate_sweep,
    validate_sweep_numbers,
)
from pipeline.config.train import (
    OPTIMIZERS,
    SCHEDULES,
    Optimizer,
    Schedule,
    TrainConfig,
    grad_accumulation_steps,
    validate_train,
    wsd_decay_start,
)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "AttentionKernel",
    "Choice",
    "ClusterConfig",
    "ConfigError",
    "DEEPSPEED_OWNED",
    "DEEPSPEED_PATH_KEY",
    "DEEPSPEED_UNRECORDED",
    "DEEPSPEED_USER_PATHS",
    "DEEPSPEED_WRITERS",
    "DOC_SPLITS",
    "DataConfig",
    "DataSource",
    "DocSplit",
    "EXPORT_DTYPES",
    "EvalConfig",
    "ExportDtype",
    "FREE",
    "LENGTH",
    "MATH",
    "MISSING",
    "ModelConfig",
    "NORMS",
    "Norm",
    "OPTIMIZERS",
    "OnBinary",
    "OnDecodeError",
    "OnOutsideLink",
    "Optimizer",
    "POS_ENCODINGS",
    "PRECISIONS",
    "ParallelConfig",
    "PipelineConfig",
    "PipelineError",
    "PlacementStrategy",
    "PosEncoding",
    "Precision",
    "RESUME_KINDS",
    "SCHEDULES",
    "SOURCES",
    "Schedule",
    "Source",
    "SourceConfig",
    "SweepConfig",
    "SweepKind",
    "SweepRun",
    "TOKENIZE_ENGINES",
    "TokenizeEngine",
    "TokenizerConfig",
    "TokenizerType",
    "TrackingConfig",
    "TrainConfig",
    "data_parallel_size",
    "replica_size",
    "fingerprint",
    "flatten",
    "grad_accumulation_steps",
    "kv_heads",
    "norm_epsilon",
    "later",
    "mlp_width",
    "resolved_run_name",
    "resume_fields",
    "run_dir_for",
    "sweep_size",
    "unknown_keys",
    "validate",
    "validate_cluster",
    "validate_data",
    "validate_deepspeed",
    "validate_eval",
    "validate_finite",
    "validate_for_submit",
    "validate_known_keys",
    "validate_model",
    "validate_names",
    "validate_parallel",
    "validate_placement",
    "validate_sweep",
    "validate_sweep_numbers",
    "validate_tracking",
    "validate_train",
    "width_multiplier",
    "wsd_decay_start",
]
