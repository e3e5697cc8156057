"""The partitioning of a prepare run: the corpus cut into partitions, on the driver, from file names and sizes alone.

A partition is a list of pieces of input files, about data.partition_bytes of input in all (less for a corpus
under MIN_PARTITIONS x data.partition_bytes, so that it still spreads over the workers: partition_limit):

    text (doc_split=line), jsonl     an uncompressed file larger than partition_bytes is cut into byte ranges;
                                     a line belongs to the range that holds its first byte
    text (file, blank_line), .gz,    whole files, consecutive ones grouped up to partition_bytes (a document
    .zst, the Shakespeare plays      never straddles two partitions; compressed streams cannot be seeked)
    parquet                          row groups, consecutive ones grouped up to partition_bytes
    hf_disk                          row ranges of the saved data set (memory-mapped Arrow)
    hf_hub                           one partition per shard of the streamed data set

Input files are listed without walking through symbolic links; a link below a directory or glob root whose
target lies outside it is skipped (and listed in the manifest) or refused before any work (data.on_outside_link;
data_prep.listing.expand_paths).

The partitioning depends only on the inputs and the config, never on the number of workers or nodes: partition i holds
the same documents whoever reads it, so the shards it becomes are the same bytes (data_prep.prepare).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import SourceError
from data_prep.listing import (
    OutsideLinks,
    compression_of,
    input_files,
    shakespeare_files,
    source_configs,
    source_files,
)
from pipeline.config import DataConfig, SourceConfig


@dataclass(frozen=True)
class Piece:
    """Part of one input: a file's byte range [start, stop) (stop None: to its end), a parquet row group, a
    row range [start, stop) of a saved Hugging Face data set, or shard `start` of a streamed hub data set."""

    path: str
    start: int = 0
    stop: int | None = None
    row_group: int | None = None


@dataclass(frozen=True)
class Partition:
    index: int
    source: int  # index into data_prep.listing.source_configs order (data.mixture, or the one source)
    pieces: tuple[Piece, ...]
    size: int  # input bytes (for progress and sampling); 0 where unknown (hub)

    def describe(self) -> str:
        """How messages name the partition's input."""
        first = self.pieces[0]
        where = first.path if first.stop is None and first.row_group is None else f"{first.path} [{first.start}:{first.stop}]"
        return where + (f" and {len(self.pieces) - 1} more" if len(self.pieces) > 1 else "")


def group(pieces: Iterable[tuple[Piece, int]], limit: int) -> Iterator[tuple[tuple[Piece, ...], int]]:
    """Consecutive pieces gathered into groups of at most `limit` bytes (a larger piece alone)."""
    current, size = [], 0
    for piece, piece_size in pieces:
        if current and size + piece_size > limit:
            yield tuple(current), size
            current, size = [], 0
        current.append(piece)
        size += piece_size
    if current:
        yield tuple(current), size


def file_pieces(src: SourceConfig, files: list[Path], limit: int) -> Iterator[tuple[tuple[Piece, ...], int]]:
    """Whole files grouped; an uncompressed line-oriented file larger than `limit` cut into byte ranges."""
    splittable = src.source == "jsonl" or (src.source == "text" and src.doc_split == "line")
    whole: list[tuple[Piece, int]] = []
    for file in files:
        size = file.stat().st_size
        if splittable and compression_of(file) is None and size > limit:
            yield from group(whole, limit)
            whole = []
            for start in range(0, size, limit):
                stop = min(size, start + limit)
                yield (Piece(str(file), start, stop),), stop - start
        else:
            whole.append((Piece(str(file)), size))
    yield from group(whole, limit)


def parquet_pieces(src: SourceConfig, files: list[Path], limit: int, where: str):
    import pyarrow.parquet as pq

    pieces = []
    for file in files:
        meta = pq.ParquetFile(file)
        if src.text_field not in meta.schema_arrow.names:
            raise SourceError(
                f"{file} has no column {src.text_field!r} (columns: {', '.join(meta.schema_arrow.names)}): "
                f"set {where}.text_field to the column that holds the text"
            )
        for rg in range(meta.metadata.num_row_groups):
            pieces.append((Piece(str(file), row_group=rg), meta.metadata.row_group(rg).total_byte_size))
    yield from group(pieces, limit)


def hf_disk_pieces(src: SourceConfig, limit: int, where: str):
    from data_prep.sources import load_hf_disk

    ds = load_hf_disk(src, where)
    rows = len(ds)
    size = max(1, int(ds.data.nbytes))
    per = max(1, int(rows * limit / size))
    for start in range(0, rows, per):
        stop = min(rows, start + per)
        yield (Piece(src.path, start, stop),), int(size * (stop - start) / max(1, rows))


def hf_hub_pieces(src: SourceConfig, where: str):
    from data_prep.sources import load_hf_hub

    ds = load_hf_hub(src, where)
    for shard in range(max(1, int(getattr(ds, "n_shards", 1)))):
        yield (Piece(src.path, shard),), 0


def source_groups(src: SourceConfig, where: str, limit: int,
                  links: OutsideLinks | None = None) -> Iterator[tuple[tuple[Piece, ...], int]]:
    """(pieces, input bytes) of each partition of one source, in order; the symbolic links that listing its files
    skipped for leaving the corpus root go to `links` (data_prep.listing.expand_paths; default: skip)."""
    if src.source == "shakespeare":
        files = shakespeare_files(src.path, f"{where}.path", links)
        yield from group(((Piece(str(f)), f.stat().st_size) for f in files), limit)
    elif src.source in ("text", "jsonl"):
        yield from file_pieces(src, source_files(src, where, links), limit)
    elif src.source == "parquet":
        yield from parquet_pieces(src, source_files(src, where, links), limit, where)
    elif src.source == "hf_disk":
        yield from hf_disk_pieces(src, limit, where)
    elif src.source == "hf_hub":
        yield from hf_hub_pieces(src, where)
    else:
        raise SourceError(f"{where}.source={src.source!r} is unknown: use shakespeare, text, jsonl, parquet, "
                          f"hf_disk or hf_hub")


def source_field(data: DataConfig, index: int) -> str:
    """How errors name a source's config entry."""
    return f"data.mixture.{index}" if data.source == "mixture" else "data"


# A corpus is cut into at least MIN_PARTITIONS partitions where that leaves them MIN_PARTITION_BYTES or more, so
# that a corpus of a few hundred MB keeps several workers busy. Derived from the input sizes alone: the partitioning
# still never depends on the number of workers.
MIN_PARTITIONS = 32
MIN_PARTITION_BYTES = 1 << 20


def partition_limit(data: DataConfig, links: OutsideLinks) -> int:
    """Input bytes per partition: data.partition_bytes, or less for a small corpus (see MIN_PARTITIONS)."""
    total = 0
    for index, src in enumerate(source_configs(data)):
        _, files = input_files(src, source_field(data, index), links)
        total += sum(f.stat().st_size for f in files)
    return int(min(data.partition_bytes, max(MIN_PARTITION_BYTES, total // MIN_PARTITIONS)))


def partition_inputs(data: DataConfig, links: OutsideLinks | None = None) -> list[Partition]:
    """The partitions of every source, in source order (see the module docstring). Symbolic links that leave a
    corpus root are skipped into `links` or refused here, before any work, as data.on_outside_link says."""
    links = links if links is not None else OutsideLinks(data.on_outside_link)
    partitions: list[Partition] = []
    limit = partition_limit(data, links)
    for index, src in enumerate(source_configs(data)):
        for pieces, size in source_groups(src, source_field(data, index), limit, links):
            partitions.append(Partition(len(partitions), index, pieces, size))
    return partitions
