"""Typed configuration of every stage, validated in one place.

The dataclasses below are the schema of the Hydra tree in ``conf/``: Hydra composes the YAML files into
them, so a misspelt key or a value of the wrong type stops at composition. Cross-field rules that types
cannot express live in :func:`validate`, which every stage runs before it starts any expensive work.
Each error names the field, the value and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING  # noqa: F401  (re-exported for YAML schemas)

from pipeline.errors import PipelineError  # noqa: F401  (re-exported: every error class derives from it)


class ConfigError(PipelineError, ValueError):
    """A configuration problem found before any work started."""


# How each field of ModelConfig and TrainConfig counts when a run resumes: its `resume` metadata, read by
# resume_fields (the model and train part of the math a checkpoint records, which a resume compares). Every field
# has one (tests/pipeline/test_config_resume.py): a new field without it fails there, not on a user's resume.
MATH = {"resume": "math"}  # changes the numbers the run computes
FREE = {"resume": "free"}  # logging, checkpointing, kernels: the same numbers whatever its value
LENGTH = {"resume": "length"}  # the run's length: math unless the schedule is constant (cosine and WSD stretch over it)


def later(before: Any) -> dict[str, Any]:
    """A math field added after checkpoints existed: it counts only when it differs from `before`, the value every
    run had before the field existed, so that older checkpoints (which never recorded it) still resume."""
    return {"resume": "later", "before": before}


RESUME_KINDS = ("math", "free", "length", "later")


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer."""

    name: str = field(default="tiny", metadata=MATH)
    # Vocabulary size in tokens; null takes it from the prepared data set's tokenizer.
    vocab_size: int | None = field(default=None, metadata=MATH)
    # Tokens the model attends over; data windows hold context_length + 1 tokens.
    context_length: int = field(default=128, metadata=MATH)
    n_layer: int = field(default=4, metadata=MATH)
    n_head: int = field(default=4, metadata=MATH)
    # Key/value heads (grouped-query attention, Ainslie et al. 2023): null = n_head (multi-head), 1 = multi-query.
    # Must divide n_head; each group of n_head / n_kv_head query heads shares one key/value head.
    n_kv_head: int | None = field(default=None, metadata=later(None))
    d_model: int = field(default=128, metadata=MATH)
    # Hidden width of the MLP; null means 4 * d_model for GELU and 8/3 * d_model rounded up to a multiple
    # of 64 for SwiGLU (mlp_width below).
    d_ff: int | None = field(default=None, metadata=MATH)
    dropout: float = field(default=0.0, metadata=MATH)
    bias: bool = field(default=True, metadata=MATH)
    tie_embeddings: bool = field(default=True, metadata=MATH)
    # learned | sinusoidal | rotary | alibi (Press et al. 2022, as BLOOM: a per-head linear bias on distance)
    pos_encoding: str = field(default="learned", metadata=MATH)
    # A norm right after the token embedding (BLOOM's word_embeddings_layernorm).
    embedding_norm: bool = field(default=False, metadata=later(False))
    # RoPE's base wavelength theta (Su et al. 2021: 10000; Llama 3: 500000).
    rope_theta: float = field(default=10000.0, metadata=later(10000.0))
    # Attention never crosses a document boundary of a packed window and positions restart at each document:
    # a document's segment starts at the EOS that precedes it (the windows' EOS tokens are the boundaries
    # prepare records; doc_starts.npy holds the same offsets + 1). Off for a model built in code, which has no EOS id
    # to mask with; every shipped model option (conf/model/) turns it on.
    document_mask: bool = field(default=False, metadata=later(False))
    # The kernel of document-masked attention: sdpa (a dense block-diagonal mask; what trains on CPU, where
    # FlexAttention has no backward) | flex (FlexAttention with a block mask, compiled; CUDA) | auto (flex on
    # CUDA, sdpa elsewhere). Either computes the same attention.
    attention_kernel: str = field(default="auto", metadata=FREE)
    # The EOS id that separates documents; null takes it from the prepared data set's tokenizer.
    eos_id: int | None = field(default=None, metadata=later(None))
    # RMSNorm of each head's queries and keys before the dot product (Dehghani et al. 2023; OLMo 2, Qwen 3).
    qk_norm: bool = field(default=False, metadata=later(False))
    # Coefficient of the z-loss z * mean(log^2 Z) on the softmax normaliser Z of the logits (PaLM: 1e-4); 0: off.
    # Added to the training loss only (validation reports the cross-entropy) and logged as train/z_loss.
    z_loss: float = field(default=0.0, metadata=later(0.0))
    # layernorm | rmsnorm
    norm: str = field(default="layernorm", metadata=MATH)
    # gelu | swiglu
    activation: str = field(default="gelu", metadata=MATH)
    # Standard deviation of the normal init; residual projections are scaled by 1/sqrt(2 * n_layer).
    init_std: float = field(default=0.02, metadata=MATH)
    # µP (maximal update parametrisation, Yang et al. 2022) relative to a base width: null is the standard
    # parametrisation. With m = d_model / mup_base_width, the hidden matrices start at init_std / sqrt(m) and
    # train (AdamW) at lr / m, and the logits are multiplied by 1 / m; embeddings, norms and biases keep init_std
    # and lr. At d_model = mup_base_width it is the standard model; a learning rate tuned there transfers.
    mup_base_width: int | None = field(default=None, metadata=later(None))


@dataclass
class TokenizerConfig:
    """SentencePiece tokenizer trained on the corpus, or an existing model."""

    # Path of an existing SentencePiece .model to use instead of training one.
    model_path: str | None = None
    # bpe | unigram
    type: str = "bpe"
    vocab_size: int = 4096
    byte_fallback: bool = True
    # Sentences (lines) of the training split the tokenizer learns from: those with the smallest seeded hashes
    # (a bottom-k sample, the same whatever the worker count) among the partitions read for it.
    sample_sentences: int = 2_000_000
    # Input bytes read for that sample: whole partitions in a seeded order until they hold this much (all of a
    # smaller corpus). Bounds the sampling pass of a huge corpus; the driver holds at most sample_sentences lines.
    sample_bytes: int = 1 << 30
    # Extra symbols kept whole (e.g. "\n" so that line breaks survive a round trip).
    user_defined_symbols: list[str] = field(default_factory=lambda: ["\n"])


@dataclass
class SourceConfig:
    """One source of a mixture (data.source=mixture): a corpus prepared into its own data set, or a data set
    prepared before (`dataset`). Training samples the sources' windows by weight (data_prep.blend)."""

    # Unique name of the source, used in the blend, its data set's directory name and the shares logged.
    name: str = "source"
    # shakespeare | text | jsonl | parquet | hf_disk | hf_hub
    source: str = "text"
    # File, directory or glob (hub name for hf_hub); null for the built-in Shakespeare plays.
    path: str | None = None
    # A data set prepared before (its directory, with manifest.json) to use as it is; source and path are
    # then unused. Its tokenizer becomes the mixture's unless data.tokenizer.model_path is set.
    dataset: str | None = None
    # Field holding the document text in jsonl / parquet / Hugging Face sources.
    text_field: str = "text"
    # How a text file splits into documents: file | line | blank_line
    doc_split: str = "file"
    # The source's share of the training windows, relative to the other weights (normalised to sum to 1):
    # weights 3 and 1 draw 75% and 25% of every batch stream from the two sources, whatever their sizes (a
    # small source is repeated, epoch after epoch; the run logs each source's share seen and its epochs).
    # Changing a weight re-tokenizes nothing: only the blend recipe (a few kilobytes) is new.
    weight: float = 1.0
    # hf_hub / hf_disk: the data set's config name, revision (a commit, tag or branch; recorded in the
    # fingerprint) and split.
    hf_config: str | None = None
    hf_revision: str | None = None
    hf_split: str = "train"


TOKENIZE_ENGINES = ("auto", "ray_data", "actors")


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is cut into training windows."""

    name: str = "shakespeare"
    # shakespeare | text | jsonl | parquet | hf_disk | hf_hub | mixture (the sources of data.mixture)
    source: str = "shakespeare"
    # File, directory or glob of the corpus; null for the built-in Shakespeare plays.
    path: str | None = None
    # Field holding the document text in jsonl / parquet / Hugging Face sources.
    text_field: str = "text"
    # How a text file splits into documents: file | line | blank_line
    doc_split: str = "file"
    # hf_hub / hf_disk: config name, revision (recorded in the fingerprint) and split of the data set.
    hf_config: str | None = None
    hf_revision: str | None = None
    hf_split: str = "train"
    # Input bytes per partition, the unit of work and of resumption: a partition becomes its own shards, so the
    # bytes written depend on this (and never on the worker count). Large line-oriented files are cut into byte
    # ranges, small files grouped (data_prep.partitions).
    partition_bytes: int = 64 << 20
    # Text a worker holds at a time while it tokenizes a partition (memory per worker ~ a few times this).
    block_bytes: int = 8 << 20
    # Files that are binary (NUL bytes in their first 8 KiB): skip (counted in the manifest) | error. NUL bytes
    # further into a text or jsonl file: skip drops the document (line, paragraph, file) holding them (counted
    # per file in the manifest); error stops, naming the file and the byte.
    on_binary: str = "skip"
    # Symbolic links below a directory or glob corpus root whose target lies outside that root (a link to a
    # credentials file beside the corpus): skip (warned, counted and listed in the manifest) | error (prepare
    # stops before any work, naming the link). Links are never walked through; one whose target stays inside the
    # root reads that file once. A file named directly in data.path is read as named.
    on_outside_link: str = "skip"
    # The longest line a jsonl or line-split text file may hold, and the largest text file read whole
    # (doc_split=file or blank_line), in bytes: one longer stops prepare naming the file (and the byte), instead of
    # filling the worker's memory with it (a crafted or broken file of gigabytes, or a .gz that expands to them).
    max_document_bytes: int = 256 << 20
    # With source=mixture: the sources and their weights (see SourceConfig.weight); the fields above
    # (path, text_field, doc_split) are then unused. Each source is prepared into its own data set with one
    # shared tokenizer (trained on a sample of all of them, weights aside), and training samples them by weight.
    mixture: list[SourceConfig] = field(default_factory=list)
    # Tokens per window minus one (windows hold context_length + 1 tokens); follows the model.
    context_length: int = 128
    # Fraction of documents (by hash) that go to the validation split.
    val_fraction: float = 0.05
    # Tokenizer actors in the pool; null uses every CPU Ray offers.
    num_workers: int | None = 2
    # How partitions reach the workers (each worker reads, tokenizes and writes its partitions either way):
    # ray_data (Ray Data map_batches over partition indices with an actor pool: its scheduling, backpressure and
    # retries; about 4 s longer to start on 2 cores) | actors (plain Ray actors fed by the driver) | auto
    # (ray_data from 1 GiB of input per worker, where that start is under 2% of the run; actors below).
    # Same bytes either way.
    tokenize_engine: str = "auto"
    # Check every shard's sha256 against the manifest before training reads it (files verified before with
    # the same size and mtime are skipped, so a resume does not hash them again); false skips the check.
    verify_checksums: bool = True
    # Target shard size in tokens.
    shard_tokens: int = 16_777_216
    # Undecodable bytes in the input: replace | skip (skip drops the whole document)
    on_decode_error: str = "replace"
    # Also write <split>_doc_starts.npy: the token offsets where documents start (for intra-document
    # attention masks); the EOS after every document marks the same boundaries in the tokens themselves.
    keep_doc_boundaries: bool = False
    # Seeds tokenizer training and the mixture's sampling and interleaving.
    seed: int = 1234
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Root of prepared data sets; each config gets its own directory below it, named by a fingerprint of the
    # config and of the input files (path, size, mtime; contents when the corpus is under 32 MB), so an edited
    # corpus is prepared anew instead of reusing the old data set.
    output_dir: str = "${output_dir}/data"


@dataclass
class ParallelConfig:
    """How the training job is spread over workers."""

    # Ray Train workers (processes); world size = tensor_parallel * data parallel size.
    num_workers: int = 2
    # DeepSpeed AutoTP degree; must divide n_head, d_ff and num_workers.
    tensor_parallel: int = 1
    # DeepSpeed ZeRO stage 0, 1, 2 or 3.
    zero_stage: int = 1
    # auto | bf16 | fp16 | fp32 (auto: bf16 where the device supports it, else fp32)
    precision: str = "auto"
    # Recompute each block's activations in the backward pass.
    activation_checkpointing: bool = False
    # Train on GPUs (NCCL); false trains on CPU with gloo.
    use_gpu: bool = False
    # GPUs reserved for each worker when use_gpu (a worker drives one device; more reserves whole GPUs for it).
    gpus_per_worker: float = 1.0
    # CPU cores reserved for each worker.
    cpus_per_worker: int = 1
    # Memory of one device in GiB that the planner (`pipeline plan`) checks the layout against before training;
    # null: the driver's GPU when it sees one (parallel.use_gpu; no check when it sees none), and on CPU the host's
    # RAM divided between the ranks of one machine (num_workers, or cluster.workers_per_node when set).
    device_memory_gb: float | None = None
    # Refuse a layout the planner says does not fit the device; false trains anyway.
    check_memory: bool = True
    # Keep the optimizer states (and fp32 master weights) in CPU memory (DeepSpeed's ZeRO-Offload; ZeRO 1-3).
    offload_optimizer: bool = False
    # Expert DeepSpeed settings merged into the generated config (nested dicts merge, a key given here wins),
    # checked by DeepSpeed's own config model before workers start: buckets, overlap, offload parameters, ...
    # e.g. +parallel.deepspeed.zero_optimization.reduce_bucket_size=50000000. What the pipeline sets itself
    # (DEEPSPEED_OWNED) and keys that make DeepSpeed write files are refused (validate_deepspeed).
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing of a training run."""

    max_steps: int = field(default=300, metadata=LENGTH)
    # Sequences per worker per micro-step.
    micro_batch_size: int = field(default=8, metadata=MATH)
    # Tokens per optimizer step over all workers; gradient accumulation fills the gap.
    global_batch_tokens: int = field(default=4096, metadata=MATH)
    lr: float = field(default=3e-3, metadata=MATH)
    # The schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = field(default=0.1, metadata=MATH)
    warmup_steps: int = field(default=30, metadata=MATH)
    # cosine | wsd (warmup-stable-decay) | constant
    schedule: str = field(default="cosine", metadata=MATH)
    # For wsd: fraction of steps spent in the final decay (it starts at wsd_decay_start(max_steps, decay_fraction)).
    decay_fraction: float = field(default=0.2, metadata=MATH)
    weight_decay: float = field(default=0.1, metadata=MATH)
    beta1: float = field(default=0.9, metadata=MATH)
    beta2: float = field(default=0.95, metadata=MATH)
    # adamw | muon: Muon (Jordan et al. 2024; DeepSpeed's MuonWithAuxAdam, which ZeRO 1-2 partition) for the 2-D
    # hidden matrices of the blocks, AdamW (lr, betas, no decay) for embeddings, unembedding, norms and biases.
    optimizer: str = field(default="adamw", metadata=later("adamw"))
    # Muon's learning rate (in units of spectral norm per update; Keller Jordan's 0.02) and momentum. The
    # schedule scales it like train.lr; Muon's matrices decay by train.weight_decay. train.grad_clip does not
    # apply with Muon (DeepSpeed would clip the gradients at ZeRO-0 but the orthogonalised updates at ZeRO 1-2).
    muon_lr: float = field(default=0.02, metadata=later(0.02))
    muon_momentum: float = field(default=0.95, metadata=later(0.95))
    grad_clip: float = field(default=1.0, metadata=MATH)
    seed: int = field(default=1337, metadata=MATH)
    log_interval_steps: int = field(default=10, metadata=FREE)
    # Validation on the training workers (the training layout, each rank a slice) every N steps and at the
    # last step, over the eval.max_tokens budget; logged as val_loss, val_perplexity, val_bits_per_byte at the
    # step (0: none during training; pipeline evaluate scores checkpoints). The shipped conf/train/default.yaml
    # sets 100; a TrainConfig built in code validates only when asked (validation reads the data set's tokenizer).
    eval_interval_steps: int = field(default=0, metadata=FREE)
    # Checkpoint every N steps (0: only at the end).
    save_interval_steps: int = field(default=0, metadata=FREE)
    # Checkpoints at these steps as well (a WSD sweep forks its decay branches from them); with
    # keep_last_checkpoints > 0 they rotate out like the others.
    save_at_steps: list[int] = field(default_factory=list, metadata=FREE)
    keep_last_checkpoints: int = field(default=2, metadata=FREE)
    # auto (latest complete checkpoint of this run, if any) | none | <path of a checkpoint tag>
    resume: str = field(default="auto", metadata=FREE)
    # Resume even when the checkpoint was trained with a different config (keys that change the math).
    allow_config_change: bool = field(default=False, metadata=FREE)
    # Optimizer steps skipped in a row for non-finite gradients (each retried on the same batch) before the run
    # stops with an error naming the step; earlier checkpoints are kept.
    max_skipped_steps: int = field(default=5, metadata=FREE)
    # Worker-group failures Ray Train recovers from (restarting from the latest complete checkpoint); -1: no limit.
    max_failures: int = field(default=0, metadata=FREE)
    # Peak device throughput in TFLOP/s for MFU; null measures a matmul at start-up.
    peak_tflops: float | None = field(default=None, metadata=FREE)
    compile: bool = field(default=False, metadata=FREE)


@dataclass
class EvalConfig:
    """Validation metrics and samples from a trained checkpoint."""

    # Which checkpoints `pipeline evaluate` scores, each logged at its own step: latest | all (every complete tag
    # of the run) | a tag (step_00000200, or a tag directory).
    checkpoint: str = "latest"
    # Validation tokens to score; null scores the whole validation split.
    max_tokens: int | None = None
    batch_size: int = 16
    num_samples: int = 3
    prompt: str = "ROMEO:"
    max_new_tokens: int = 120
    # 0 means greedy decoding.
    temperature: float = 0.8
    # 0 disables top-k.
    top_k: int = 50
    # 1.0 disables nucleus sampling.
    top_p: float = 0.95
    seed: int = 0
    # `pipeline export`: the Hugging Face directory to write (null: <run dir>/hf/<checkpoint tag>).
    export_dir: str | None = None
    # fp32 | bf16: the exported weights' dtype (converted one tensor at a time).
    export_dtype: str = "fp32"
    # Safetensors files of at most this size, with model.safetensors.index.json when there are several.
    export_shard_size: str = "5GB"
    # lm-eval-harness tasks run on the exported model by `pipeline evaluate` (needs lm-eval installed).
    tasks: list[str] = field(default_factory=list)
    # At most this many examples per task (null: all).
    tasks_limit: int | None = None


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    # Tracking URI; null uses a SQLite store under output_dir.
    uri: str | None = None
    experiment: str = "pipeline"
    # MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, GPU
    # utilisation and memory where pynvml sees GPUs, ...) of rank 0's node, and as system/node<k>/... of every other
    # node of the run, averaged over this many seconds and logged at the training step reached; 0 turns them off.
    system_metrics_interval_s: float = 10.0


@dataclass
class ClusterConfig:
    """Where Ray runs."""

    # local (Ray started in-process) | ray | slurm | kubernetes
    name: str = "local"
    # Where Ray is: null starts Ray in this process; "auto" joins the cluster this process runs on (inside a
    # Ray job or a Slurm allocation); host:port joins a running cluster. `pipeline submit` takes the
    # cluster's Jobs API URL here instead (http://HOST:8265).
    address: str | None = None
    # CPUs the in-process Ray may use; null uses every core of the machine.
    num_cpus: int | None = None
    # How training workers are placed on nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD.
    placement_strategy: str = "PACK"
    # Exactly this many training workers on each node (null: as the placement strategy puts them): the
    # workers fill num_workers / workers_per_node nodes of the cluster, chosen among those with room.
    workers_per_node: int | None = None
    # Seconds `pipeline submit` waits to reach the cluster before giving up.
    connect_timeout_s: float = 10.0
    # What `pipeline submit` uploads as the job's working directory: "auto" is this source tree (without
    # .venv, outputs, .git); a path uploads that directory; null uploads nothing (the image has the project).
    runtime_env_working_dir: str | None = "auto"
    # Absolute mount point of the storage every node of the cluster shares (e.g. /shared). When set,
    # `pipeline submit` requires output_dir below it and trusts it even if this machine does not mount it.
    shared_storage: str | None = None
    # An object store that keeps the data sets and checkpoints for nodes that share no file system
    # (s3://bucket/prefix, gs://..., hdfs://..., file:///...; pipeline.cluster.storage): output_dir is then a
    # working directory on each node, and `pipeline submit` checks that the store is writable.
    storage_uri: str | None = None


@dataclass
class SweepRun:
    """One planned run of a sweep.kind=points sweep (written by `pipeline scaling plan`)."""

    d_model: int
    tokens: int
    budget_flops: float | None = None
    # The run's peak learning rate (null: train.lr).
    lr: float | None = None


@dataclass
class SweepConfig:
    """A scaling-law sweep: each point is one training run (see pipeline.scaling.sweep)."""

    name: str = "none"
    # isoflop: for each compute budget, every model size with D = C / (6 N) | grid: every size x token count |
    # points: the runs listed in sweep.runs (as `pipeline scaling plan` writes them)
    kind: str = "isoflop"
    runs: list[SweepRun] = field(default_factory=list)
    # One run per model size with a WSD schedule (train.schedule=wsd); each shorter token budget of that size is a
    # decay branch forked from the long run's stable phase at its decay start, instead of a run from step 0.
    branches: bool = False
    # The width at which train.lr holds under the learning-rate width rule lr(d) = train.lr * lr_base_width / d
    # (pipeline.scaling.plan; null: the smallest width planned). Unused under µP (model.mup_base_width).
    lr_base_width: int | None = None
    # Compute budgets in FLOPs (isoflop).
    budgets_flops: list[float] = field(default_factory=list)
    # Training tokens per run (grid).
    tokens: list[float] = field(default_factory=list)
    # Model sizes by width; depth and heads follow the shape rule below.
    d_models: list[int] = field(default_factory=list)
    # Shape rule: n_layer = max(1, round(d_model / aspect_ratio)), n_head = d_model / head_dim, d_ff = 4 d_model.
    aspect_ratio: int = 32
    head_dim: int = 16
    # Budgets (FLOPs) at which the fit predicts compute-optimal N, D and loss.
    predict_flops: list[float] = field(default_factory=lambda: [1e21, 5.76e23])
    n_bootstrap: int = 200
    # Approach 3's bootstrap: starts per replicate drawn from the whole initial grid (null: all 4,500, about
    # 10x the time: ~3 min for 200 replicates of 15 points on 2 cores against ~15 s at 300).
    bootstrap_starts: int | None = 300
    # Train only this point of the grid (0-based, in the order `pipeline sweep` logs them), so that Hydra
    # multirun runs each point as its own job: pipeline sweep -m sweep=isoflop_tiny 'sweep.point=range(15)'
    # (with hydra/launcher=pipeline_slurm, as Slurm jobs). The job that completes the grid fits it.
    point: int | None = None


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Everything the pipeline writes goes below this directory.
    output_dir: str = "outputs"
    # Name of the training run; its checkpoints live in <output_dir>/runs/<run_name>.
    run_name: str = "${model.name}-${data.name}"


def resume_fields(train: TrainConfig, model: ModelConfig) -> dict[str, dict[str, Any]]:
    """{"model": ..., "train": ...}: the settings of the model and the optimisation that change the numbers a run
    computes, by each field's `resume` metadata (MATH, FREE, LENGTH, later). A checkpoint records them in its math
    config and a resume compares them, so the result must stay byte-identical for the configs of older checkpoints."""
    return {"model": _counted(model, train.schedule), "train": _counted(train, train.schedule)}


def _counted(section: Any, schedule: str) -> dict[str, Any]:
    values = asdict(section)
    counted = {}
    for spec in fields(section):
        kind = spec.metadata["resume"]
        if kind == "free" or (kind == "length" and schedule == "constant"):
            continue
        if kind == "later" and values[spec.name] == spec.metadata["before"]:
            continue
        counted[spec.name] = values[spec.name]
    return counted


def wsd_decay_start(max_steps: int, decay_fraction: float) -> int:
    """The first step of a WSD schedule's decay: the last round(max_steps * decay_fraction) steps (at least one)
    decay. Before it the learning rate does not depend on max_steps, which is what lets a longer run's
    checkpoint there start a shorter run's decay (a WSD branch)."""
    return max_steps - max(1, round(max_steps * decay_fraction))


def width_multiplier(cfg: ModelConfig) -> float:
    """µP's m = d_model / mup_base_width (1.0 without µP)."""
    return 1.0 if cfg.mup_base_width is None else cfg.d_model / cfg.mup_base_width


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads: model.n_kv_head, or n_head when it is null."""
    return cfg.n_head if cfg.n_kv_head is None else cfg.n_kv_head


def mlp_width(cfg: ModelConfig) -> int:
    """The MLP's hidden width d_ff. When model.d_ff is null: 4 * d_model for GELU; for SwiGLU 8/3 * d_model
    rounded up to a multiple of 64 (three matrices of 8/3 d_model hold as many parameters as GELU's two of
    4 d_model, as in PaLM and Llama; the rounding keeps matrix shapes friendly to the hardware)."""
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.activation == "swiglu":
        return 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return 4 * cfg.d_model


POS_ENCODINGS = ("learned", "sinusoidal", "rotary", "alibi")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
SOURCES = ("shakespeare", "text", "jsonl", "parquet", "hf_disk", "hf_hub")
DOC_SPLITS = ("file", "line", "blank_line")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
EXPORT_DTYPES = ("fp32", "bf16")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}: set {name} to one of them.")


def _positive(name: str, value: float) -> None:
    if value is None or not 0 < value < math.inf:  # NaN fails the comparison
        raise ConfigError(f"{name}={value!r} must be positive: set {name} to a number > 0.")


def _non_negative(name: str, value: float, meaning: str = "") -> None:
    """value >= 0; meaning says what 0 means (e.g. "0 turns it off")."""
    if not 0 <= value < math.inf:
        why = f" ({meaning})" if meaning else ""
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0{why}: set {name} to 0 or more.")


def _fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    """low <= value < high."""
    if not low <= value < high:
        raise ConfigError(f"{name}={value!r} must be in [{low:g}, {high:g}): set {name} inside that range.")


def _finite_numbers(obj: Any, prefix: str) -> list[str]:
    """Dotted names of the float values below obj (dataclass fields, list items, dict values) that are NaN or
    infinite: Hydra reads `nan` and `inf` as floats, and a NaN slips through every `value <= 0` check."""
    if hasattr(obj, "__dataclass_fields__"):
        return [n for key in obj.__dataclass_fields__ for n in _finite_numbers(getattr(obj, key), f"{prefix}{key}.")]
    if isinstance(obj, dict):
        return [n for key, value in obj.items() for n in _finite_numbers(value, f"{prefix}{key}.")]
    if isinstance(obj, list):
        return [n for i, value in enumerate(obj) for n in _finite_numbers(value, f"{prefix}{i}.")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{prefix.rstrip('.')}={obj}"]
    return []


def validate_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of the config (or of its section named by prefix, e.g. "parallel.") is a number: NaN and
    infinity are refused, naming the field."""
    bad = _finite_numbers(cfg, prefix)
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not a finite number; set {'it' if len(bad) == 1 else 'each'} to a "
                          f"finite value (NaN and inf are never valid settings).")


def validate_model(model: ModelConfig) -> None:
    for key in ("context_length", "n_layer", "n_head", "d_model"):
        _positive(f"model.{key}", getattr(model, key))
    if model.d_model % model.n_head:
        raise ConfigError(
            f"model.d_model={model.d_model} is not divisible by model.n_head={model.n_head}: "
            f"choose n_head among the divisors of d_model (e.g. "
            f"{', '.join(str(h) for h in _divisors(model.d_model)[:8])}) or change d_model."
        )
    if model.pos_encoding == "rotary" and (model.d_model // model.n_head) % 2:
        raise ConfigError(
            f"rotary position encoding needs an even head size; d_model/n_head = "
            f"{model.d_model // model.n_head}: change model.n_head or model.d_model."
        )
    _choice("model.pos_encoding", model.pos_encoding, POS_ENCODINGS)
    n_kv = kv_heads(model)
    if n_kv <= 0 or model.n_head % n_kv:
        raise ConfigError(
            f"model.n_kv_head={model.n_kv_head} must divide model.n_head={model.n_head}: choose among "
            f"{', '.join(map(str, _divisors(model.n_head)))} (1 is multi-query attention, null is n_head)."
        )
    _positive("model.rope_theta", model.rope_theta)
    _choice("model.attention_kernel", model.attention_kernel, ("auto", "sdpa", "flex"))
    if model.mup_base_width is not None:
        _positive("model.mup_base_width", model.mup_base_width)
    if model.z_loss < 0:
        raise ConfigError(f"model.z_loss={model.z_loss} must be >= 0 (0 turns it off; PaLM used 1e-4).")
    _choice("model.norm", model.norm, NORMS)
    _choice("model.activation", model.activation, ACTIVATIONS)
    if model.vocab_size is not None:
        _positive("model.vocab_size", model.vocab_size)
    if model.d_ff is not None:
        _positive("model.d_ff", model.d_ff)
    if model.eos_id is not None:
        _non_negative("model.eos_id", model.eos_id, "a token id")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout} must be in [0, 1).")
    _positive("model.init_std", model.init_std)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_data(data: DataConfig, model: ModelConfig | None = None) -> None:
    _choice("data.source", data.source, (*SOURCES, "mixture"))
    _choice("data.doc_split", data.doc_split, DOC_SPLITS)
    _choice("data.on_decode_error", data.on_decode_error, ("replace", "skip"))
    _choice("data.on_binary", data.on_binary, ("skip", "error"))
    _choice("data.on_outside_link", data.on_outside_link, ("skip", "error"))
    _positive("data.partition_bytes", data.partition_bytes)
    _positive("data.block_bytes", data.block_bytes)
    _positive("data.max_document_bytes", data.max_document_bytes)
    _choice("data.tokenizer.type", data.tokenizer.type, ("bpe", "unigram"))
    _positive("data.context_length", data.context_length)
    if model is not None and data.context_length != model.context_length:
        raise ConfigError(
            f"data.context_length={data.context_length} differs from model.context_length="
            f"{model.context_length}: set both to the same value (data.context_length follows the model "
            f"unless overridden)."
        )
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must be in [0, 1).")
    if data.num_workers is not None:
        _positive("data.num_workers", data.num_workers)
    if data.tokenize_engine not in TOKENIZE_ENGINES:
        raise ConfigError(
            f"data.tokenize_engine={data.tokenize_engine!r} is not one of {', '.join(TOKENIZE_ENGINES)}: "
            f"use auto unless you measure a reason to force one."
        )
    if data.source == "mixture":
        _validate_mixture(data.mixture)
    elif data.mixture:
        raise ConfigError(
            f"data.mixture lists {len(data.mixture)} sources but data.source={data.source}: set data.source=mixture "
            f"to mix them, or data.mixture=[] to read data.path alone."
        )
    else:
        _check_source_path("data", data.source, data.path)
    _positive("data.shard_tokens", data.shard_tokens)
    _non_negative("data.seed", data.seed, "numpy's generators take no negative seed")
    if "${" in str(data.output_dir):
        raise ConfigError(
            f"data.output_dir={data.output_dir} holds an unresolved interpolation: set data.output_dir to a "
            f"directory (it is resolved when the config is composed by Hydra)."
        )
    tok = data.tokenizer
    for key in ("vocab_size", "sample_sentences", "sample_bytes"):
        _positive(f"data.tokenizer.{key}", getattr(tok, key))
    if tok.model_path is not None:
        _check_path_exists("data.tokenizer.model_path", tok.model_path)
    else:
        if tok.vocab_size > 4_294_967_295:
            raise ConfigError(f"data.tokenizer.vocab_size={tok.vocab_size} does not fit uint32 token ids.")
        # unk/bos/eos/pad, the user-defined symbols and, with byte fallback, one piece per byte value.
        needed = 4 + len(tok.user_defined_symbols) + (256 if tok.byte_fallback else 0)
        if tok.vocab_size <= needed:
            raise ConfigError(
                f"data.tokenizer.vocab_size={tok.vocab_size} leaves no room for learned pieces: the special "
                f"pieces{' and the 256 byte pieces of byte_fallback' if tok.byte_fallback else ''} alone take "
                f"{needed}: raise data.tokenizer.vocab_size well above {needed}."
            )


def _check_source_path(prefix: str, source: str, path: str | None) -> None:
    """The corpus named by prefix.source / prefix.path exists (prefix: data or data.mixture.<i>)."""
    if source == "shakespeare":
        if path is not None:
            _check_path_exists(f"{prefix}.path", path)
    elif source == "hf_hub":
        if not path:
            raise ConfigError(f"{prefix}.source=hf_hub needs {prefix}.path=<dataset name on the hub>.")
    else:
        if not path:
            raise ConfigError(f"{prefix}.source={source} needs {prefix}.path=<file, directory or glob>.")
        _check_path_exists(f"{prefix}.path", path)


def _validate_mixture(mixture: list[SourceConfig]) -> None:
    if not mixture:
        raise ConfigError(
            "data.source=mixture but data.mixture is empty: list the sources, e.g. data=mixture "
            "(conf/data/mixture.yaml), or set data.source to a single source."
        )
    names = [src.name for src in mixture]
    for i, src in enumerate(mixture):
        prefix = f"data.mixture.{i}"
        if not src.name or src.name in names[:i]:
            problem = "empty" if not src.name else "taken by an earlier source"
            raise ConfigError(
                f"{prefix}.name={src.name!r} is {problem}: give every source of the mixture its own name (the "
                f"manifest reports statistics by name)."
            )
        _choice(f"{prefix}.source", src.source, SOURCES)
        _choice(f"{prefix}.doc_split", src.doc_split, DOC_SPLITS)
        if not math.isfinite(src.weight) or src.weight <= 0:
            raise ConfigError(
                f"{prefix}.weight={src.weight} must be a positive number (the source's share of the training "
                f"windows relative to the other weights): remove the source to leave it out."
            )
        if src.dataset:
            if not (Path(src.dataset).expanduser() / "manifest.json").is_file():
                raise ConfigError(
                    f"{prefix}.dataset={src.dataset} is not a prepared data set (it has no manifest.json): point it "
                    f"at a directory that `pipeline prepare` wrote, or give {prefix}.source and {prefix}.path instead"
                )
            continue
        _check_source_path(prefix, src.source, src.path)


def _check_path_exists(name: str, path: str) -> None:
    if any(ch in path for ch in "*?["):
        # Only the directory where the pattern starts: matching it is a walk of the corpus, done once by prepare
        # without following links (data_prep.sources.expand_paths); glob.glob(recursive=True) here would follow
        # a link loop below it for ever.
        start = Path()
        for part in Path(os.path.expanduser(path)).parts:
            if any(ch in part for ch in "*?["):
                break
            start /= part
        if not start.is_dir():
            raise ConfigError(f"{name}={path} matches no file ({start}, where the pattern starts, is not a "
                              f"directory): fix the pattern or point {name} at existing files.")
        return
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"{name}={path} does not exist: point {name} at an existing file or directory"
            + (" (or leave data.path unset to use the built-in Shakespeare plays)." if name == "data.path" else ".")
        )


def validate_parallel(parallel: ParallelConfig, model: ModelConfig) -> None:
    validate_finite(parallel, "parallel.")  # `pipeline plan` validates this section alone
    _positive("parallel.num_workers", parallel.num_workers)
    _positive("parallel.tensor_parallel", parallel.tensor_parallel)
    _positive("parallel.cpus_per_worker", parallel.cpus_per_worker)
    if parallel.device_memory_gb is not None:
        _positive("parallel.device_memory_gb", parallel.device_memory_gb)
    if parallel.gpus_per_worker <= 0:
        raise ConfigError(f"parallel.gpus_per_worker={parallel.gpus_per_worker} must be > 0.")
    _choice("parallel.precision", parallel.precision, PRECISIONS)
    if parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={parallel.zero_stage} must be 0, 1, 2 or 3.")
    tp = parallel.tensor_parallel
    if parallel.num_workers % tp:
        raise ConfigError(
            f"parallel.num_workers={parallel.num_workers} is not divisible by parallel.tensor_parallel={tp}: "
            f"the world size must be tensor_parallel x data-parallel size."
        )
    if model.n_head % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.n_head={model.n_head}: "
            f"choose a tensor-parallel degree among {', '.join(map(str, _divisors(model.n_head)))}."
        )
    if kv_heads(model) % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide model.n_kv_head={kv_heads(model)}: AutoTP splits the "
            f"key/value heads across ranks; choose a degree among {', '.join(map(str, _divisors(kv_heads(model))))} "
            f"or more key/value heads."
        )
    if model.attention_kernel == "flex" and not parallel.use_gpu:
        raise ConfigError(
            "model.attention_kernel=flex trains only on GPUs: FlexAttention has no backward pass on CPU in this "
            "torch. Use model.attention_kernel=auto (sdpa on CPU) or parallel.use_gpu=true."
        )
    if model.pos_encoding == "alibi" and tp > 1:
        raise ConfigError(
            "model.pos_encoding=alibi with parallel.tensor_parallel > 1: each rank would need the slopes of the "
            "heads AutoTP gives it, which it cannot know; train ALiBi models with tensor_parallel=1 (ZeRO shards "
            "them) or choose rotary positions."
        )
    d_ff = mlp_width(model)  # 8/3 d_model rounded for SwiGLU when d_ff is null
    if d_ff % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.d_ff={d_ff}.")
    if parallel.offload_optimizer and parallel.zero_stage == 0:
        raise ConfigError(
            "parallel.offload_optimizer=true needs ZeRO (DeepSpeed offloads the optimizer states it partitions): "
            "set parallel.zero_stage to 1, 2 or 3."
        )
    if tp > 1 and parallel.zero_stage == 3:
        raise ConfigError(
            "DeepSpeed AutoTP training does not combine with ZeRO stage 3: "
            "set parallel.zero_stage to 0, 1 or 2 with parallel.tensor_parallel > 1."
        )


# DeepSpeed settings the pipeline derives itself (pipeline.train.ds_config.make_ds_config, and the driver's universal
# loading), each with the field that owns it: through parallel.deepspeed they would train another layout than the one
# the pipeline records, plans and checkpoints. A dotted key covers everything below it.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_tokens",
    "gradient_accumulation_steps": "train.global_batch_tokens",
    "elasticity": "train.global_batch_tokens",  # elastic training chooses its own batch sizes
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer.device": "parallel.offload_optimizer",
    "zero_force_ds_cpu_optimizer": "parallel.offload_optimizer",
    "tensor_parallel": "parallel.tensor_parallel",
    "bf16": "parallel.precision",
    "bfloat16": "parallel.precision",  # DeepSpeed's older name of bf16
    "fp16": "parallel.precision",
    "amp": "parallel.precision",
    "torch_autocast": "parallel.precision",
    "data_types": "parallel.precision",
    "communication_data_type": "parallel.precision",
    "seq_parallel_communication_data_type": "parallel.precision",
    "optimizer": "train.optimizer",
    "zero_allow_untested_optimizer": "train.optimizer",
    "scheduler": "train.schedule",
    # How checkpoints are written and loaded is pipeline.checkpoint's; universal loading follows train.resume.
    "checkpoint": "train.resume",
    "datastates_ckpt": "train.resume",
    "zero_optimization.elastic_checkpoint": "train.resume",
    "zero_optimization.load_from_fp32_weights": "train.resume",
}
# DeepSpeed features that change what a step computes, or how ZeRO partitions the states (and so a checkpoint's
# layout), without the run recording it: its config, math fingerprint, plan and checkpoints would not describe
# what trained.
DEEPSPEED_UNRECORDED = {
    "curriculum_learning": "the order and length of the training samples",
    "data_efficiency": "the order and length of the training samples",
    "progressive_layer_drop": "which layers train at each step",
    "compression_training": "the model's weights and activations",
    "quantize_training": "the precision of the weights",
    "eigenvalue": "the optimizer's step",
    "prescale_gradients": "how gradients are averaged",
    "gradient_predivide_factor": "how gradients are averaged",
    "zero_optimization.mics_shard_size": "how ZeRO partitions the states (the checkpoint's layout)",
    "zero_optimization.mics_hierarchical_params_gather": "how ZeRO partitions the states",
    "zero_optimization.zero_hpz_partition_size": "how ZeRO partitions the states",
    "pipeline": "the parallel layout (pipeline parallelism)",
    "sequence_parallel_size": "the parallel layout (sequence parallelism)",
}
# DeepSpeed's own monitors and its autotuner write files (and send metrics) where they choose.
DEEPSPEED_WRITERS = ("tensorboard", "wandb", "csv_monitor", "comet", "autotuning")
# A key that names a file or directory: flops_profiler.output_file, *.output_path, autotuning's results_dir, ...
DEEPSPEED_PATH_KEY = re.compile(r"(^|_)(path|paths|dir|dirs|file|files|folder)$")
# ZeRO-Infinity's NVMe swap directory is the user's to choose (a fast local disk), like the offload itself.
DEEPSPEED_USER_PATHS = ("nvme_path",)


def _deepspeed_leaves(settings: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of parallel.deepspeed (an empty dict is a leaf too)."""
    leaves = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            leaves += _deepspeed_leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def _deepspeed_refusal(key: str, value: Any, parallel: ParallelConfig, train: TrainConfig) -> str | None:
    """Why parallel.deepspeed may not hold key=value (None when it may)."""
    setting = f"parallel.deepspeed.{key}={json.dumps(value, default=str)}"
    owned = [k for k in DEEPSPEED_OWNED if key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.")]
    if owned:
        owner = DEEPSPEED_OWNED[owned[0]]
        section, name = owner.split(".")
        current = getattr({"parallel": parallel, "train": train}[section], name)
        fix = ("the pipeline writes and loads checkpoints itself (pipeline.checkpoint; universal loading follows "
               "train.resume): drop the key" if owner == "train.resume" else f"set {owner} instead")
        return (f"{setting} contradicts {owner}={current}: the pipeline derives DeepSpeed's {owned[0]} from it and "
                f"records, plans and checkpoints the run by it; {fix}.")
    unrecorded = [k for k in DEEPSPEED_UNRECORDED if key == k or key.startswith(f"{k}.")]
    if unrecorded:
        return (f"{setting} changes {DEEPSPEED_UNRECORDED[unrecorded[0]]} without the run recording it (its config, "
                f"plan and checkpoints would not describe what trained): the pipeline does not support it; drop the "
                f"key.")
    last = key.rsplit(".", 1)[-1]
    if key.split(".")[0] in DEEPSPEED_WRITERS or (DEEPSPEED_PATH_KEY.search(last) and last not in DEEPSPEED_USER_PATHS):
        return (f"{setting} would have DeepSpeed write files of its own: the pipeline logs metrics to MLflow "
                f"(tracking.*) and writes only below output_dir; drop the key.")
    return None


def validate_deepspeed(parallel: ParallelConfig, train: TrainConfig) -> None:
    """parallel.deepspeed holds expert settings only (buckets, overlap, offload of parameters, ...): nothing the
    pipeline sets itself, and nothing that makes DeepSpeed write files outside output_dir."""
    for key, value in _deepspeed_leaves(parallel.deepspeed):
        refusal = _deepspeed_refusal(key, value, parallel, train)
        if refusal:
            raise ConfigError(refusal)


def data_parallel_size(parallel: ParallelConfig) -> int:
    return parallel.num_workers // parallel.tensor_parallel


def grad_accumulation_steps(train: TrainConfig, parallel: ParallelConfig, context_length: int) -> int:
    per_step = train.micro_batch_size * data_parallel_size(parallel) * context_length
    return train.global_batch_tokens // per_step


def _validate_train_numbers(train: TrainConfig) -> None:
    """The ranges of train's numbers (each field's comment says what 0 means where 0 is allowed)."""
    for key in ("max_steps", "micro_batch_size", "global_batch_tokens", "log_interval_steps"):
        _positive(f"train.{key}", getattr(train, key))
    for key in ("lr", "muon_lr"):  # AdamW's rates are ~1e-4 to 1e-2 and Muon's ~0.02: 1 or more is a typo
        value = getattr(train, key)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"train.{key}={value!r} must be in (0, 1): set a learning rate such as 3e-4.")
    for key in ("beta1", "beta2", "muon_momentum"):
        _fraction(f"train.{key}", getattr(train, key))
    _non_negative("train.weight_decay", train.weight_decay, "0 turns decay off")
    _non_negative("train.grad_clip", train.grad_clip, "0 turns clipping off")
    _non_negative("train.seed", train.seed, "numpy's generators take no negative seed")
    _non_negative("train.eval_interval_steps", train.eval_interval_steps, "0: no validation during training")
    _non_negative("train.save_interval_steps", train.save_interval_steps, "0: a checkpoint only at the end")
    _non_negative("train.keep_last_checkpoints", train.keep_last_checkpoints, "0 keeps every checkpoint")
    _non_negative("train.max_skipped_steps", train.max_skipped_steps, "0 stops at the first non-finite step")
    if train.max_failures < -1:  # Ray Train's FailureConfig: -1 retries without limit
        raise ConfigError(f"train.max_failures={train.max_failures} must be >= 0, or -1 for no limit: set "
                          f"train.max_failures to the worker-group failures to recover from.")
    if train.peak_tflops is not None:
        _positive("train.peak_tflops", train.peak_tflops)
    if train.warmup_steps < 0 or train.warmup_steps >= train.max_steps:
        raise ConfigError(
            f"train.warmup_steps={train.warmup_steps} must be in [0, train.max_steps={train.max_steps})."
        )
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={train.min_lr_ratio} must be in [0, 1].")
    if not 0.0 < train.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={train.decay_fraction} must be in (0, 1].")
    for step in train.save_at_steps:
        if not 0 < step <= train.max_steps:
            raise ConfigError(f"train.save_at_steps holds {step}: each must be in [1, train.max_steps="
                              f"{train.max_steps}].")


def validate_train(train: TrainConfig, parallel: ParallelConfig, model: ModelConfig) -> None:
    _validate_train_numbers(train)
    _choice("train.schedule", train.schedule, SCHEDULES)
    _choice("train.optimizer", train.optimizer, OPTIMIZERS)
    if train.optimizer == "muon":
        if parallel.tensor_parallel > 1:
            raise ConfigError(
                "train.optimizer=muon with parallel.tensor_parallel > 1: Muon orthogonalises each whole matrix, "
                "AutoTP leaves each rank a slice of it, and DeepSpeed does not gather the slices for Muon; train "
                "Muon with tensor_parallel=1 (ZeRO 1-2 partition its state) or use train.optimizer=adamw."
            )
        if model.mup_base_width is not None:
            raise ConfigError(
                "train.optimizer=muon with model.mup_base_width: µP's rules here are AdamW's (lr / m on hidden "
                "matrices); Muon's per-matrix scale sets its own width dependence. Use one or the other."
            )
        if parallel.zero_stage == 3 or parallel.offload_optimizer:
            raise ConfigError(
                f"train.optimizer=muon with parallel.zero_stage={parallel.zero_stage}, offload_optimizer="
                f"{parallel.offload_optimizer}: Muon is tested with ZeRO 0-2 without offload (DeepSpeed's ZeRO-3 "
                f"and offload paths of Muon are not): choose parallel.zero_stage 0, 1 or 2 and "
                f"offload_optimizer=false."
            )
    dp = data_parallel_size(parallel)
    per_step = train.micro_batch_size * dp * model.context_length
    if train.global_batch_tokens % per_step:
        raise ConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} is not divisible by micro_batch_size "
            f"x data-parallel size x context_length = {train.micro_batch_size} x {dp} x "
            f"{model.context_length} = {per_step}: set train.global_batch_tokens to a multiple of {per_step}."
        )
    if train.resume not in ("auto", "none") and not Path(train.resume).exists():
        raise ConfigError(
            f"train.resume={train.resume} is neither auto, none nor an existing checkpoint directory."
        )


def validate_eval(ev: EvalConfig) -> None:
    _positive("eval.batch_size", ev.batch_size)
    if ev.temperature < 0:
        raise ConfigError(f"eval.temperature={ev.temperature} must be >= 0 (0 is greedy).")
    if ev.top_k < 0:
        raise ConfigError(f"eval.top_k={ev.top_k} must be >= 0 (0 disables top-k).")
    if not 0.0 < ev.top_p <= 1.0:
        raise ConfigError(f"eval.top_p={ev.top_p} must be in (0, 1].")
    if ev.max_tokens is not None:
        _positive("eval.max_tokens", ev.max_tokens)
    _non_negative("eval.num_samples", ev.num_samples, "0: no samples")
    _positive("eval.max_new_tokens", ev.max_new_tokens)
    _non_negative("eval.seed", ev.seed, "a seed is a non-negative integer")
    if ev.tasks_limit is not None:
        _positive("eval.tasks_limit", ev.tasks_limit)
    _choice("eval.export_dtype", ev.export_dtype, EXPORT_DTYPES)
    if ev.checkpoint in ("", None):
        raise ConfigError("eval.checkpoint is empty: set latest, all, or a checkpoint tag (step_00000200).")


def sweep_size(sweep: SweepConfig) -> int:
    """The number of runs (points) a sweep trains."""
    if sweep.kind == "points":
        return len(sweep.runs)
    return len(sweep.d_models) * len(sweep.budgets_flops if sweep.kind == "isoflop" else sweep.tokens)


def validate_sweep_numbers(sweep: SweepConfig) -> None:
    """The ranges of the sweep's numbers, whether or not a sweep is chosen (validate runs this for every stage)."""
    for key in ("budgets_flops", "tokens", "d_models", "predict_flops"):
        for value in getattr(sweep, key):
            _positive(f"sweep.{key}", value)
    for key in ("aspect_ratio", "head_dim"):
        _positive(f"sweep.{key}", getattr(sweep, key))
    _non_negative("sweep.n_bootstrap", sweep.n_bootstrap, "0: no bootstrap intervals")
    for key in ("lr_base_width", "bootstrap_starts"):
        if getattr(sweep, key) is not None:
            _positive(f"sweep.{key}", getattr(sweep, key))
    if sweep.point is not None:
        _non_negative("sweep.point", sweep.point, "an index into the sweep's grid")
    for i, run in enumerate(sweep.runs):
        _positive(f"sweep.runs.{i}.d_model", run.d_model)
        _positive(f"sweep.runs.{i}.tokens", run.tokens)
        if run.budget_flops is not None:
            _positive(f"sweep.runs.{i}.budget_flops", run.budget_flops)
        if run.lr is not None and not 0.0 < run.lr < 1.0:
            raise ConfigError(f"sweep.runs.{i}.lr={run.lr!r} must be in (0, 1), or null for train.lr.")


def validate_sweep(sweep: SweepConfig, train: TrainConfig | None = None) -> None:
    _choice("sweep.kind", sweep.kind, ("isoflop", "grid", "points"))
    validate_sweep_numbers(sweep)
    if sweep.name == "none":
        raise ConfigError("no sweep chosen: pass sweep=<name> (e.g. sweep=isoflop_tiny; see conf/sweep/).")
    widths = [r.d_model for r in sweep.runs] if sweep.kind == "points" else sweep.d_models
    if not widths:
        raise ConfigError("sweep.runs is empty: run `pipeline scaling plan` to write them." if sweep.kind == "points"
                          else "sweep.d_models is empty: list the model widths to train.")
    for d in widths:
        if d % sweep.head_dim:
            raise ConfigError(f"sweep holds the width {d}, not a multiple of sweep.head_dim={sweep.head_dim}.")
    if sweep.kind == "isoflop" and not sweep.budgets_flops:
        raise ConfigError("sweep.kind=isoflop needs sweep.budgets_flops (compute budgets in FLOPs).")
    if sweep.kind == "grid" and not sweep.tokens:
        raise ConfigError("sweep.kind=grid needs sweep.tokens (training tokens per run).")
    if sweep.branches and train is not None and train.schedule != "wsd":
        raise ConfigError(
            f"sweep.branches=true with train.schedule={train.schedule}: decay branches fork from the stable phase "
            f"of a WSD schedule; pass train.schedule=wsd (or sweep.branches=false for one run per point)."
        )
    if sweep.branches and sweep.point is not None:
        raise ConfigError(
            f"sweep.point={sweep.point} with sweep.branches=true: a decay branch needs its model size's longest run "
            f"trained first, so one process trains a branched sweep; drop sweep.point (or set sweep.branches=false "
            f"to run every point as its own job)."
        )
    n_points = sweep_size(sweep)
    if sweep.point is not None and not 0 <= sweep.point < n_points:
        raise ConfigError(f"sweep.point={sweep.point} is outside the grid of sweep {sweep.name}, which has {n_points} "
                          f"points: use 0 .. {n_points - 1} (e.g. 'sweep.point=range({n_points})' with -m).")


def validate_cluster(cluster: ClusterConfig) -> None:
    _choice("cluster.placement_strategy", cluster.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    for key in ("workers_per_node", "num_cpus"):
        if getattr(cluster, key) is not None:
            _positive(f"cluster.{key}", getattr(cluster, key))
    _positive("cluster.connect_timeout_s", cluster.connect_timeout_s)


def validate_tracking(tracking: TrackingConfig) -> None:
    _non_negative("tracking.system_metrics_interval_s", tracking.system_metrics_interval_s, "0 turns them off")


def validate_placement(cluster: ClusterConfig, parallel: ParallelConfig) -> None:
    per_node = cluster.workers_per_node
    if per_node is not None and parallel.num_workers % per_node:
        raise ConfigError(
            f"parallel.num_workers={parallel.num_workers} is not a multiple of cluster.workers_per_node={per_node}: "
            f"every node gets the same number of workers; use parallel.num_workers="
            f"{per_node * max(1, round(parallel.num_workers / per_node))} or another workers_per_node."
        )


def unknown_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of attributes that a `+key=value` override added to the schema's dataclasses.

    Hydra lets `+key` append to a structured config, and OmegaConf.to_object then sets the stray key as an
    attribute of the dataclass; nothing reads it, so a misspelt `+trian.max_steps=5` would be silently ignored.
    """
    if not hasattr(obj, "__dataclass_fields__"):
        if isinstance(obj, list):
            return [k for i, item in enumerate(obj) for k in unknown_keys(item, f"{prefix}{i}.")]
        return []
    known = obj.__dataclass_fields__
    found = [f"{prefix}{name}" for name in vars(obj) if name not in known]
    for name in known:
        found += unknown_keys(getattr(obj, name), f"{prefix}{name}.")
    return found


def validate_known_keys(cfg: Any) -> None:
    stray = unknown_keys(cfg)
    if stray:
        raise ConfigError(
            f"unknown config key(s) {', '.join(stray)}: the schema (pipeline/config.py) has no such field, so the "
            f"value would be ignored. Check the spelling (`pipeline train --cfg job` prints every key) and drop "
            f"the leading '+'."
        )


def validate(cfg: PipelineConfig) -> None:
    """Every cross-field check, run before any stage does work."""
    validate_known_keys(cfg)
    validate_names(cfg)
    validate_finite(cfg)
    validate_cluster(cfg.cluster)
    validate_tracking(cfg.tracking)
    validate_sweep_numbers(cfg.sweep)
    validate_placement(cfg.cluster, cfg.parallel)
    validate_model(cfg.model)
    validate_data(cfg.data, cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    validate_train(cfg.train, cfg.parallel, cfg.model)
    validate_deepspeed(cfg.parallel, cfg.train)
    validate_eval(cfg.eval)


def run_dir_for(cfg: PipelineConfig) -> Path:
    """<output_dir>/runs/<run_name>: the run's checkpoints, MLflow run id, exports and Ray Train files. run_name
    must be a plain name (pipeline.containment), so that the run directory lies below output_dir."""
    from pipeline.containment import plain_name

    return Path(cfg.output_dir) / "runs" / plain_name(resolved_run_name(cfg), "run_name")


def resolved_run_name(cfg: PipelineConfig) -> str:
    """cfg.run_name; its default template resolved when the config was built in Python rather than by Hydra."""
    return cfg.run_name.replace("${model.name}", cfg.model.name).replace("${data.name}", cfg.data.name)


def validate_names(cfg: PipelineConfig) -> None:
    """The names that become directory names below output_dir are plain names (run_name, data.name, the names of
    a mixture's sources): `run_name=../../x` must not write outside output_dir."""
    from pipeline.containment import plain_name

    plain_name(cfg.data.name, "data.name")  # first: run_name's default holds it
    for i, src in enumerate(cfg.data.mixture):
        plain_name(src.name, f"data.mixture.{i}.name")
    plain_name(resolved_run_name(cfg), "run_name")


def validate_for_submit(cfg: PipelineConfig) -> None:
    """The checks of `validate` that hold wherever the job runs: input paths and output_dir live on the
    cluster's storage, so `pipeline submit` does not look them up here (it checks them with its own rules)."""
    validate_known_keys(cfg)
    validate_names(cfg)
    validate_finite(cfg)
    validate_cluster(cfg.cluster)
    validate_tracking(cfg.tracking)
    validate_sweep_numbers(cfg.sweep)
    validate_model(cfg.model)
    validate_parallel(cfg.parallel, cfg.model)
    validate_train(cfg.train, cfg.parallel, cfg.model)
    validate_deepspeed(cfg.parallel, cfg.train)
    validate_eval(cfg.eval)


def fingerprint(obj: Any, length: int = 12) -> str:
    """Stable short hash of a (nested) dataclass or dict, for naming outputs keyed by their config."""
    data = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.n_layer": 4, ...} from a nested dataclass, for logging as MLflow params; credentials in URIs
    (tracking.uri=http://user:secret@host, a storage URI's keys) come out as ***."""
    from pipeline.redaction import redact_values

    data = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact_values(value)
    return out
