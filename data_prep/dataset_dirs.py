"""Where each data set lives, known before it is prepared: directories named by a fingerprint of what shapes
their bytes, so that a changed config or corpus never writes over an old data set.

    a data set         <output_dir>/<name>-<fingerprint>/: the data config less what does not change the bytes
                       (worker count, engine, location), the format and recipe versions, the input files (their
                       names, sizes and modification times, or contents for a small corpus: data_prep.mixture.
                       corpus_record) and a given tokenizer's content
    being built        the same name with PARTIAL_SUFFIX (data_prep.partial), renamed when complete
    a mixture's blend  <output_dir>/<name>-<fingerprint of its recipe>/: the tokenizer, each source and the weights
    its sources        <output_dir>/<name>.<source>-<fingerprint>/: each source's own data set, made with the
                       mixture's tokenizer (component_config)
    its tokenizer      <output_dir>/<name>.tokenizer-<fingerprint>/ when trained for the mixture (tokenizer_dir)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from data_prep.blend import BLEND_VERSION, blend_incomplete_reason, is_blend
from data_prep.mixture import corpus_record
from data_prep.shards import (  # noqa: F401 (PARTIAL_SUFFIX, partial_dir, finished_dir: named from here too)
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    TOKENIZER_FILE,
    finished_dir,
    incomplete_reason,
    load_manifest,
    partial_dir,
    sha256_file,
)
from pipeline.config import DataConfig, fingerprint
from pipeline.containment import plain_name

# Fields that do not change the bytes written.
_NOT_IN_FINGERPRINT = ("num_workers", "tokenize_engine", "output_dir", "verify_checksums", "block_bytes")
# Bump when the same config would produce different bytes (reading, tokenizer training, packing), so that
# a new recipe gets a new directory instead of silently reusing data sets made by the old one.
RECIPE_VERSION = 6


def data_fingerprint(data: DataConfig, corpus: list[dict] | None = None) -> str:
    """Fingerprint of what shapes the bytes: the config (less worker count and location), the format and
    recipe versions, and the input files (corpus_record, computed here unless given)."""
    record = {**config_record(data), "format_version": FORMAT_VERSION, "recipe_version": RECIPE_VERSION,
              "corpus": corpus_record(data) if corpus is None else corpus}
    model = Path(data.tokenizer.model_path).expanduser() if data.tokenizer.model_path else None
    if model is not None and model.is_file():  # a given tokenizer by content: a changed file, a new data set
        record["tokenizer"] = {**record["tokenizer"], "model_path": f"sha256:{sha256_file(model)}"}
    if data.tokenizer.hf:  # a checkpoint's tokenizer by content (its file and conventions), not its path
        record["tokenizer"] = {"hf": f"sha256:{hf_source(data).identity()}"}
    return fingerprint(record)


def tokenizer_vocab_size(data: DataConfig) -> int:
    """The vocabulary the data set's tokenizer will have, known before prepare: a checkpoint's (data.tokenizer.hf) or
    a given model's size, else data.tokenizer.vocab_size (what planning and parameter counts use before the data
    set exists)."""
    if data.tokenizer.hf:
        return hf_source(data).tokenizer().vocab_size
    if data.tokenizer.model_path and Path(data.tokenizer.model_path).expanduser().is_file():
        from data_prep.tokenizer import load_tokenizer

        return load_tokenizer(Path(data.tokenizer.model_path).expanduser()).get_piece_size()
    return data.tokenizer.vocab_size


def hf_source(data: DataConfig):
    """data.tokenizer.hf's directory, read (data_prep.hf_tokenizer) once while its files stay as they are: a
    fingerprint, the mixture's names and the planned vocabulary each ask for it, and a tokenizer.json can be tens
    of megabytes."""
    directory = Path(data.tokenizer.hf).expanduser().resolve()
    return _read_hf_source(str(directory), _files_stamp(directory))


_HF_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json",
             "generation_config.json")


def _files_stamp(directory: Path) -> tuple:
    stamp = []
    for name in _HF_FILES:
        try:
            st = os.lstat(directory / name)
        except OSError:
            continue
        stamp.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamp)


@functools.lru_cache(maxsize=8)
def _read_hf_source(directory: str, stamp: tuple):
    from data_prep.hf_tokenizer import HFTokenizerSource

    return HFTokenizerSource(directory)


def config_record(data: DataConfig) -> dict:
    """The data config as recorded in the manifest: only what shapes the bytes, so that the manifest is
    identical whatever the worker count or output location."""
    fields = dataclasses.asdict(data)
    for key in _NOT_IN_FINGERPRINT:
        fields.pop(key)
    if fields["tokenizer"]["hf"] is None:  # unset: the record (and the names of data sets made before it) as before
        fields["tokenizer"].pop("hf")
    return fields


def dataset_dir(data: DataConfig, corpus: list[dict] | None = None) -> Path:
    """The directory of this config's data set (a mixture's: its blend), known without preparing it."""
    plain_name(data.name, "data.name")  # the directory lies below data.output_dir
    if data.source == "mixture":
        return blend_dir(data)
    return Path(data.output_dir) / f"{data.name}-{data_fingerprint(data, corpus)}"


def is_complete(out: Path) -> bool:
    return (blend_incomplete_reason(out) if is_blend(out) else incomplete_reason(out)) is None


def blend_dir(data: DataConfig) -> Path:
    """The blend's directory, named by its recipe (known before anything is prepared): the tokenizer, each
    source (a prepared data set by directory, a corpus by its data set's fingerprint less the tokenizer) and the
    weights."""
    parts = []
    for i, src in enumerate(data.mixture):
        what = (str(Path(src.dataset).expanduser().resolve()) if src.dataset
                else data_fingerprint(component_config(data, i, None)))
        parts.append([src.name, what, src.weight])
    recipe = {"blend_version": BLEND_VERSION, "recipe_version": RECIPE_VERSION, "tokenizer": tokenizer_identity(data),
              "parts": parts}
    return Path(data.output_dir) / f"{data.name}-{fingerprint(recipe)}"


def tokenizer_identity(data: DataConfig) -> str:
    """The mixture's tokenizer, known before it is trained: a given file's sha256, a prepared source's, or the
    name (recipe fingerprint) of the one trained for this mixture."""
    if data.tokenizer.hf:
        return f"sha256:{hf_source(data).identity()}"
    if data.tokenizer.model_path:
        return f"sha256:{sha256_file(Path(data.tokenizer.model_path).expanduser())}"
    for src in data.mixture:
        if src.dataset:
            return f"sha256:{load_manifest(Path(src.dataset).expanduser()).tokenizer_sha256}"
    return tokenizer_dir(data).name


def tokenizer_dir(data: DataConfig) -> Path:
    """Named by what shapes the tokenizer: the corpora, data.tokenizer, the seed and the split (it is trained
    on the training split), not the context length or the shard size."""
    shape = dataclasses.replace(sources_to_prepare(data), context_length=0, shard_tokens=0, keep_doc_boundaries=False)
    return Path(data.output_dir) / f"{data.name}.tokenizer-{data_fingerprint(shape)}"


def shared_tokenizer(data: DataConfig) -> Path:
    """Where the mixture's tokenizer is (or will be once trained): data.tokenizer.model_path, else the first
    prepared data set's, else the one trained for this mixture (data.tokenizer.hf: its directory's file)."""
    if data.tokenizer.hf:
        return hf_source(data).path
    if data.tokenizer.model_path:
        return Path(data.tokenizer.model_path).expanduser().resolve()
    for src in data.mixture:
        if src.dataset:
            return load_manifest(Path(src.dataset).expanduser()).tokenizer_path
    return tokenizer_dir(data) / TOKENIZER_FILE


def sources_to_prepare(data: DataConfig) -> DataConfig:
    """The mixture's sources that are corpora (not prepared data sets), weights aside: what the shared
    tokenizer is trained on, so that no weight changes it."""
    return dataclasses.replace(data, mixture=[dataclasses.replace(src, weight=1.0) for src in data.mixture
                                              if not src.dataset])


def component_config(data: DataConfig, index: int, tokenizer: Path | None) -> DataConfig:
    """The single-source config of data.mixture[index], with the mixture's tokenizer: preparing it alone
    (`pipeline prepare data.source=... data.tokenizer.model_path=...`) writes the same shards. With
    data.tokenizer.hf, every source keeps it."""
    src = data.mixture[index]
    return dataclasses.replace(
        data, name=f"{data.name}.{src.name}", source=src.source, path=src.path, text_field=src.text_field,
        doc_split=src.doc_split, hf_config=src.hf_config, hf_revision=src.hf_revision, hf_split=src.hf_split,
        mixture=[], tokenizer=data.tokenizer if data.tokenizer.hf else dataclasses.replace(
            data.tokenizer, model_path=str(tokenizer) if tokenizer else None),
    )


def blend_parts(data: DataConfig) -> list[tuple[str, Path, float]]:
    """(name, data set directory, weight) of every source, once the shared tokenizer exists (a data set
    made with a given tokenizer is named by the tokenizer's content)."""
    tokenizer = shared_tokenizer(data)
    parts = []
    for i, src in enumerate(data.mixture):
        path = Path(src.dataset).expanduser().resolve() if src.dataset else dataset_dir(
            component_config(data, i, tokenizer))
        parts.append((src.name, path, src.weight))
    return parts
