"""data.*: where the corpus comes from (one source or a mixture), its tokenizer, and how it is cut into windows."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.base import Choice, ConfigError, choice, non_negative, positive
from pipeline.config.model import ModelConfig


class TokenizerType(Choice):
    bpe = "bpe"
    unigram = "unigram"


class Source(Choice):
    """Where one corpus comes from (data.source, data.mixture.<i>.source)."""

    shakespeare = "shakespeare"
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"
    hf_disk = "hf_disk"
    hf_hub = "hf_hub"


class DataSource(Choice):
    """data.source: one of Source's, or the sources of data.mixture."""

    shakespeare = "shakespeare"
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"
    hf_disk = "hf_disk"
    hf_hub = "hf_hub"
    mixture = "mixture"


class DocSplit(Choice):
    file = "file"
    line = "line"
    blank_line = "blank_line"


class OnDecodeError(Choice):
    replace = "replace"
    skip = "skip"


class OnBinary(Choice):
    skip = "skip"
    error = "error"


class OnOutsideLink(Choice):
    skip = "skip"
    error = "error"


class TokenizeEngine(Choice):
    auto = "auto"
    ray_data = "ray_data"
    actors = "actors"


@dataclass
class TokenizerConfig:
    """SentencePiece tokenizer trained on the corpus, an existing model, or a Hugging Face checkpoint's own."""

    # Path of an existing SentencePiece .model to use instead of training one.
    model_path: str | None = None
    # A local Hugging Face model or tokenizer directory whose own tokenizer (tokenizer.json, else its SentencePiece
    # tokenizer.model) tokenizes the corpus, with its BOS/EOS conventions (data_prep.hf_tokenizer): what continued
    # pretraining of model.init_from needs. The fields below are then unused.
    hf: str | None = None
    # bpe | unigram
    type: TokenizerType = TokenizerType.bpe
    vocab_size: int = 4096
    byte_fallback: bool = True
    # Line occurrences of the training split the tokenizer learns from: a uniform random sample of those in the
    # input read for it (seeded keys per occurrence, the same whatever the worker count; data_prep.tokenizer_sample).
    # SentencePiece's own documented example size; 2,000,000 gave the same tokens per byte within 0.02% on a
    # generated corpus (vocabulary 8192) and trains in twice the time.
    sample_sentences: int = 1_000_000
    # Input bytes read for that sample: the first bytes of up to 64 partitions in a seeded order, the same fraction
    # of each (all of a smaller corpus). Bounds the sampling pass (about 5 s on 2 cores at this default) whatever
    # the corpus's size; the driver holds at most about 2 x sample_sentences lines.
    sample_bytes: int = 256 << 20
    # Extra symbols kept whole (e.g. "\n" so that line breaks survive a round trip).
    user_defined_symbols: list[str] = field(default_factory=lambda: ["\n"])


@dataclass
class SourceConfig:
    """One source of a mixture (data.source=mixture): a corpus prepared into its own data set, or a data set
    prepared before (`dataset`). Training samples the sources' windows by weight (data_prep.blend)."""

    # Unique name of the source, used in the blend, its data set's directory name and the shares logged.
    name: str = "source"
    # shakespeare | text | jsonl | parquet | hf_disk | hf_hub
    source: Source = Source.text
    # File, directory or glob (hub name for hf_hub); null for the built-in Shakespeare plays.
    path: str | None = None
    # A data set prepared before (its directory, with manifest.json) to use as it is; source and path are
    # then unused. Its tokenizer becomes the mixture's unless data.tokenizer.model_path is set.
    dataset: str | None = None
    # Field holding the document text in jsonl / parquet / Hugging Face sources.
    text_field: str = "text"
    # How a text file splits into documents: file | line | blank_line
    doc_split: DocSplit = DocSplit.file
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


TOKENIZE_ENGINES = TokenizeEngine.values()
SOURCES = Source.values()
DOC_SPLITS = DocSplit.values()


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is cut into training windows."""

    name: str = "shakespeare"
    # shakespeare | text | jsonl | parquet | hf_disk | hf_hub | mixture (the sources of data.mixture)
    source: DataSource = DataSource.shakespeare
    # File, directory or glob of the corpus; null for the built-in Shakespeare plays.
    path: str | None = None
    # Field holding the document text in jsonl / parquet / Hugging Face sources.
    text_field: str = "text"
    # How a text file splits into documents: file | line | blank_line
    doc_split: DocSplit = DocSplit.file
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
    on_binary: OnBinary = OnBinary.skip
    # Symbolic links below a directory or glob corpus root whose target lies outside that root (a link to a
    # credentials file beside the corpus): skip (warned, counted and listed in the manifest) | error (prepare
    # stops before any work, naming the link). Links are never walked through; one whose target stays inside the
    # root reads that file once. A file named directly in data.path is read as named.
    on_outside_link: OnOutsideLink = OnOutsideLink.skip
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
    # (ray_data from 4 GiB of input per worker; plain actors below, as fast and lighter: data_prep.encoding).
    # Same bytes either way.
    tokenize_engine: TokenizeEngine = TokenizeEngine.auto
    # Check every shard's sha256 against the manifest before training reads it (files verified before with
    # the same size and mtime are skipped, so a resume does not hash them again); false skips the check.
    verify_checksums: bool = True
    # Target shard size in tokens.
    shard_tokens: int = 16_777_216
    # Undecodable bytes in the input: replace | skip (skip drops the whole document)
    on_decode_error: OnDecodeError = OnDecodeError.replace
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


def validate_data(data: DataConfig, model: ModelConfig | None = None) -> None:
    choice("data.source", data.source, DataSource)
    choice("data.doc_split", data.doc_split, DocSplit)
    choice("data.on_decode_error", data.on_decode_error, OnDecodeError)
    choice("data.on_binary", data.on_binary, OnBinary)
    choice("data.on_outside_link", data.on_outside_link, OnOutsideLink)
    positive("data.partition_bytes", data.partition_bytes)
    positive("data.block_bytes", data.block_bytes)
    positive("data.max_document_bytes", data.max_document_bytes)
    choice("data.tokenizer.type", data.tokenizer.type, TokenizerType)
    positive("data.context_length", data.context_length)
    if model is not None and data.context_length != model.context_length:
        raise ConfigError(
            f"data.context_length={data.context_length} differs from model.context_length="
            f"{model.context_length}: set both to the same value (data.context_length follows the model "
            f"unless overridden)."
        )
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction} must be in [0, 1).")
    if data.num_workers is not None:
        positive("data.num_workers", data.num_workers)
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
    positive("data.shard_tokens", data.shard_tokens)
    non_negative("data.seed", data.seed, "numpy's generators take no negative seed")
    if "${" in str(data.output_dir):
        raise ConfigError(
            f"data.output_dir={data.output_dir} holds an unresolved interpolation: set data.output_dir to a "
            f"directory (it is resolved when the config is composed by Hydra)."
        )
    tok = data.tokenizer
    for key in ("vocab_size", "sample_sentences", "sample_bytes"):
        positive(f"data.tokenizer.{key}", getattr(tok, key))
    if tok.model_path is not None and tok.hf is not None:
        raise ConfigError(f"data.tokenizer.model_path={tok.model_path} and data.tokenizer.hf={tok.hf} both name a "
                          f"tokenizer: keep one (hf for a Hugging Face checkpoint's directory).")
    if tok.hf is not None:
        if not tok.hf.strip() or not Path(tok.hf).expanduser().is_dir():
            raise ConfigError(f"data.tokenizer.hf={tok.hf} is not a directory: give a local Hugging Face model or "
                              f"tokenizer directory (with its tokenizer.json).")
    elif tok.model_path is not None:
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
        choice(f"{prefix}.source", src.source, Source)
        choice(f"{prefix}.doc_split", src.doc_split, DocSplit)
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
        # without following links (data_prep.listing.expand_paths); glob.glob(recursive=True) here would follow
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
