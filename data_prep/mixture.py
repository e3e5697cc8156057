"""A data config's corpus seen whole, for naming a data set and for small corpora and tests: the corpus
fingerprint (corpus_record), and every document of one source or of all of them in one list (read_source,
read_documents).

The corpus fingerprint names every input file by (path, size, mtime_ns), or by its sha256 when the whole
corpus is small, so that a changed input gives a new data set directory instead of a stale one (data_prep.
dataset_dirs); a hub data set by its name, config, revision and split. The files are those prepare reads,
listed the same way (links that leave a corpus root left out: data_prep.listing.expand_paths). A source that
cannot be listed is recorded as such rather than raised, so that a stage that only looks a data set up does not
need its corpus.

The documents come in partition order (data_prep.partitions), each source's once whatever its weight: a mixture's
weights act in training, where the loader samples each source's data set by them (data_prep.blend), never here.
Prepare itself never holds a corpus in one process: it reads partition by partition on the workers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.decode_report import DecodeReport
from data_prep.errors import SourceError
from data_prep.listing import OutsideLinks, input_files, source_configs, warn_outside_links
from data_prep.partitions import source_field, source_groups
from data_prep.shards import sha256_file
from data_prep.sources import piece_documents
from pipeline.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)

# Below this many bytes of input in all, the fingerprint hashes file contents (robust to a touched mtime).
_HASH_CONTENT_BYTES = 32 << 20


def corpus_record(data: DataConfig) -> list[dict]:
    """Per source, its input files as [name, size, sha256 or mtime_ns] (see the module docstring); a hub
    data set is named only by its hub name. Cheap: one stat per file, hashing only small corpora."""
    links = OutsideLinks(data.on_outside_link)
    listed = [(src, *_listed_files(src, source_field(data, i), links)) for i, src in enumerate(source_configs(data))]
    small = sum(size for _, _, files in listed for _, size, _, _ in files) <= _HASH_CONTENT_BYTES
    record = []
    for src, problem, files in listed:
        entry = {"name": src.name, "source": src.source, "path": src.path}
        if src.source in ("hf_hub", "hf_disk"):
            entry |= {"hf_config": src.hf_config, "hf_revision": src.hf_revision, "hf_split": src.hf_split}
        if problem:
            entry["unreadable"] = problem
        entry["files"] = [[name, size, sha256_file(path) if small else mtime_ns] for name, size, path, mtime_ns in files]
        record.append(entry)
    return record


def _listed_files(src: SourceConfig, where: str,
                  links: OutsideLinks) -> tuple[str | None, list[tuple[str, int, Path, int]]]:
    """(problem, [(name, size, path, mtime_ns)]): a source that cannot be listed is recorded, not raised, so
    that a stage that only looks the data set up does not need the corpus (prepare reports the problem)."""
    try:
        root, files = input_files(src, where, links)
    except (SourceError, OSError) as err:
        return str(err), []
    listed = []
    for path in files:
        stat = path.stat()
        listed.append((str(path.relative_to(root)) if root else str(path), stat.st_size, path, stat.st_mtime_ns))
    return None, listed


def read_source(src: SourceConfig, data: DataConfig, where: str = "data") -> tuple[list[str], DecodeReport]:
    """All non-empty documents of one source in one list, in partition order: for small corpora and tests only
    (prepare reads partition by partition on the workers, never a whole source in one process)."""
    links = OutsideLinks(data.on_outside_link)
    pieces = [piece for group, _ in source_groups(src, where, data.partition_bytes, links) for piece in group]
    warn_outside_links(links.skipped)
    report = DecodeReport(outside_links=links.skipped)
    docs = [doc for piece in pieces for doc in piece_documents(src, piece, data, report, where)]
    report.files = len({piece.path for piece in pieces})
    report.log_summary()
    if not docs:
        raise SourceError(
            f"the corpus ({where}.source={src.source}, {where}.path={src.path}) holds no non-empty document"
            + (f"; {report.skipped_documents} were skipped as undecodable" if report.skipped_documents else "")
            + f": point {where}.path at files with text in them"
        )
    return docs, report


def read_documents(data: DataConfig) -> tuple[list[str], DecodeReport]:
    """All non-empty documents of the configured corpus in one list, in partition order (each source of a mixture
    once, in its order): for small corpora and tests only; prepare never holds a corpus in one process."""
    from data_prep.partition_work import ReadContext, partition_documents
    from data_prep.partitions import partition_inputs

    ctx = ReadContext.of(data)
    links = OutsideLinks(data.on_outside_link)
    partitions = partition_inputs(data, links)
    warn_outside_links(links.skipped)
    report = DecodeReport(outside_links=links.skipped)
    docs = [doc for part in partitions for doc in partition_documents(part, ctx, report)]
    report.files = len({piece.path for part in partitions for piece in part.pieces})
    report.log_summary()
    if not docs:
        raise SourceError(f"the corpus (data.source={data.source}) holds no non-empty document: point data.path "
                          f"at files with text in them")
    return docs, report
