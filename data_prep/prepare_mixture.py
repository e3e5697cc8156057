"""A mixture (data.source=mixture) prepared source by source, then blended.

    tokenizer  one for all the sources: data.tokenizer.model_path, a prepared source's, or trained once on a
               sample of every corpus source, weights aside (in `<name>.tokenizer-<fingerprint>/`; resumable and
               locked like a data set)
    sources    each its own data set (`<name>.<source>-<fingerprint>/`), exactly what `pipeline prepare` of that
               source alone with that tokenizer writes (data_prep.build); a source given as a prepared data set
               is adopted beside the blend instead
    blend      the recipe that names them with their weights (data_prep.blend): a new weight writes a new
               recipe and tokenizes nothing

Where each of these lives is data_prep.dataset_dirs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from data_prep.blend import adopt_dataset, write_blend
from data_prep.build import ProgressSink, prepare_source
from data_prep.dataset_dirs import (
    blend_dir,
    blend_parts,
    component_config,
    is_complete,
    partial_dir,
    shared_tokenizer,
    sources_to_prepare,
)
from data_prep.encoding import pool_size
from data_prep.errors import DataPrepError
from data_prep.partial import open_state, publish
from data_prep.partition_work import ReadContext
from data_prep.partitions import partition_inputs
from data_prep.shards import TOKENIZER_FILE, ShardError, incomplete_reason, load_manifest
from data_prep.tokenizer_setup import make_tokenizer
from pipeline.cluster.storage import NO_MIRROR, Mirror
from pipeline.config import DataConfig, validate_data

log = logging.getLogger("data_prep.prepare")  # the stage's one log, whichever module writes the line


def prepare_mixture(data: DataConfig, sink: ProgressSink | None = None, mirror: Mirror = NO_MIRROR) -> Path:
    """The blend of data.mixture: its tokenizer and its sources' data sets prepared where missing (each
    resumable like any data set), then the recipe. Returns the blend's directory."""
    from pipeline.files import directory_lock

    validate_data(data)
    out = blend_dir(data)
    if is_complete(out):
        log.info("blend %s is already prepared: skipping", out)
        return out
    _refuse_unsettable_tokenizer(data)
    tokenizer = shared_tokenizer(data)
    if (not tokenizer.is_file() and not data.tokenizer.model_path and not data.tokenizer.hf
            and not any(src.dataset for src in data.mixture)):
        _prepare_tokenizer(sources_to_prepare(data), tokenizer.parent)
    parts = []
    for i, (name, path, weight) in enumerate(blend_parts(data)):
        if data.mixture[i].dataset:
            reason = incomplete_reason(path)
            if reason is not None:
                raise DataPrepError(f"data.mixture.{i}.dataset={data.mixture[i].dataset} is not a complete data set "
                                    f"({reason}): prepare it again, or point the entry at its source instead")
            path = adopt_dataset(path, out.parent, f"{data.name}.{name}")  # a blend names only its neighbours
        else:
            log.info("mixture %s: source %s", data.name, name)
            path = prepare_source(component_config(data, i, tokenizer), sink, name, mirror)
        parts.append((name, path, weight))
    out.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(partial_dir(out)):
        try:
            blend = write_blend(out, parts)
        except ShardError as err:  # the sources' data sets disagree, or one is damaged
            raise DataPrepError(str(err)) from err
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    for component in blend.components:
        log.info("blend %s: %s, weight %g (share %.1f%%), %d training windows", out.name, component.name,
                 component.weight, 100 * component.share, component.windows.get("train", 0))
    return out


def _refuse_unsettable_tokenizer(data: DataConfig) -> None:
    """A prepared source tokenized with a checkpoint's tokenizer (data.tokenizer.hf) cannot hand it to the sources
    still to prepare as data.tokenizer.model_path: its conventions live in its manifest, not the file."""
    if data.tokenizer.hf or data.tokenizer.model_path or all(src.dataset for src in data.mixture):
        return
    for i, src in enumerate(data.mixture):
        if src.dataset:
            manifest = load_manifest(Path(src.dataset).expanduser())
            if manifest.tokenizer_file != TOKENIZER_FILE or manifest.document_prefix:
                raise DataPrepError(
                    f"data.mixture.{i}.dataset={src.dataset} was tokenized with a Hugging Face checkpoint's tokenizer "
                    f"({manifest.tokenizer_file}); the mixture's other sources need it too: set data.tokenizer.hf=<that "
                    f"checkpoint's directory>")
            return


def _prepare_tokenizer(data: DataConfig, out_dir: Path) -> Path:
    """Train the mixture's tokenizer on a seeded, bounded sample of all its sources (as a single data set's
    is trained) into out_dir, unless it is there; resumable and locked like a data set."""
    from pipeline.files import directory_lock

    path = out_dir / TOKENIZER_FILE
    if path.is_file():
        return path
    partial = partial_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(partial):
        if path.is_file():
            shutil.rmtree(partial, ignore_errors=True)
            return path
        partitions = partition_inputs(data)
        state = open_state(partial, partitions)
        make_tokenizer(partitions, ReadContext.of(data), partial, state, pool_size(data.num_workers))
        publish(partial, out_dir)
    return path
