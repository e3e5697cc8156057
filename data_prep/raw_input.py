"""A corpus file's bytes on their way to text, checked: decompressed (.gz, .zst), probed for binary content,
read line by line within a byte range or whole (never past data.max_document_bytes), cut into paragraphs, decoded
with undecodable bytes counted, and NUL bytes or characters skipped or refused (data.on_binary). Anything that
cannot be read is a SourceError naming the file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.decode_report import DecodeReport, add_count
from data_prep.errors import SourceError
from data_prep.listing import compression_of

log = logging.getLogger(__name__)

# Blank lines between paragraphs (data.doc_split=blank_line).
_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r\f\v]*\n")


BINARY_PROBE_BYTES = 8192


def open_input(path: str | Path):
    """A binary stream of the file, decompressed when it ends in .gz or .zst (pyarrow's codecs)."""
    import io

    compression = compression_of(path)
    if compression is None:
        return open(path, "rb")
    import pyarrow as pa

    return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), compression), 1 << 20)


def unreadable(path, err: Exception, where: str) -> SourceError:
    return SourceError(
        f"{path} cannot be read ({type(err).__name__}: {err}): a compressed file is truncated or corrupt, or the "
        f"file is not what its name says; replace it, or remove it from {where}.path"
    )


def is_binary(path: str | Path, where: str = "data") -> bool:
    """Whether the file (decompressed) holds a NUL byte in its first 8 KiB: text never does."""
    try:
        with open_input(path) as f:
            return b"\0" in f.read(BINARY_PROBE_BYTES)
    except (OSError, EOFError, ValueError) as err:
        raise unreadable(path, err, where) from err


def skip_binary(path: str | Path, on_binary: str, report: DecodeReport, where: str) -> bool:
    """True (counted in report.binary_files) when the file is binary and data.on_binary=skip; raises when
    data.on_binary=error."""
    if not is_binary(path, where):
        return False
    if on_binary == "error":
        raise SourceError(
            f"{path} is a binary file (NUL bytes in its first {BINARY_PROBE_BYTES} bytes), not text: remove it "
            f"from {where}.path, or set data.on_binary=skip to skip such files (they are counted in the manifest)"
        )
    if str(path) not in report.binary_files:
        log.warning("skipping %s: it is a binary file, not text (data.on_binary=skip)", path)
        report.binary_files.append(str(path))
    return True


def piece_lines(piece, where: str = "data", limit: int = 256 << 20) -> Iterator[tuple[str, int, bytes]]:
    """(place, byte offset, raw line) of a piece of a line-oriented file. In a byte range [start, stop) a line
    belongs to the range holding its first byte; a compressed file is read whole. A line longer than `limit`
    bytes (data.max_document_bytes) is a SourceError naming it: it is never held in memory whole."""
    try:
        with open_input(piece.path) as f:
            whole = piece.start == 0 and piece.stop is None
            position = piece.start
            if position > 0:
                f.seek(position - 1)
                position += _skip_line(f) - 1  # the rest of the line that began in the previous range
            number = 0
            while piece.stop is None or position < piece.stop:
                raw = f.readline(limit + 1)
                if not raw:
                    return
                number += 1
                place = f"{piece.path}:{number}" if whole else f"{piece.path} (byte {position})"
                if len(raw) > limit:
                    raise SourceError(f"{piece.path} (byte {position}) holds a line of more than {limit} bytes: no document "
                                      f"is that long; fix the file, or raise data.max_document_bytes if it is")
                yield place, position, raw
                position += len(raw)
    except (OSError, EOFError, ValueError) as err:
        if isinstance(err, SourceError):
            raise
        raise unreadable(piece.path, err, where) from err


def _skip_line(f, chunk: int = 1 << 20) -> int:
    """Read past the rest of the current line in chunks (never holding it whole); the bytes skipped."""
    skipped = 0
    while True:
        part = f.readline(chunk)
        skipped += len(part)
        if not part or part.endswith(b"\n"):
            return skipped


def read_whole(path: str | Path, where: str = "data", limit: int | None = None) -> bytes:
    """The file's bytes (decompressed); with `limit`, a SourceError for a file of more than limit bytes."""
    try:
        with open_input(path) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except (OSError, EOFError, ValueError) as err:
        raise unreadable(path, err, where) from err
    if limit is not None and len(data) > limit:
        raise SourceError(f"{path} holds more than {limit} bytes, and a text file split by file or by blank lines "
                          f"is read whole: split the file into smaller ones (or use doc_split=line), or raise "
                          f"data.max_document_bytes")
    return data


def paragraphs(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of each paragraph: the stretches between blank lines."""
    start = 0
    for gap in _PARAGRAPH_BREAK.finditer(raw):
        yield start, raw[start:gap.start()]
        start = gap.end()
    yield start, raw[start:]


def decode_bytes(raw: bytes, place: str, file: str, on_error: str, report: DecodeReport) -> str | None:
    """UTF-8 text of raw (a document of `file`, at `place`); undecodable bytes are counted (per file too), then
    replaced (U+FFFD) or the document skipped (None)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # surrogateescape maps each bad byte to one lone surrogate: an exact count of the bytes.
    escaped = raw.decode("utf-8", errors="surrogateescape")
    bad = sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
    report.bad_bytes += bad
    report.bad_bytes_documents += 1
    add_count(report.bad_bytes_by_file, file, bad)
    if on_error == "skip":
        report.skipped_documents += 1
        log.warning("skipping %s: it is not valid UTF-8 (data.on_decode_error=skip)", place)
        return None
    return raw.decode("utf-8", errors="replace")


def holds_nul(raw: bytes, place: str, offset: int, file: str, on_binary: str, report: DecodeReport) -> bool:
    """True (counted, per file too) when a document's bytes hold a NUL byte and data.on_binary=skip: binary
    data inside a text file, past the first 8 KiB that is_binary probes. Raises when data.on_binary=error.
    `offset`: where raw starts in the (decompressed) file."""
    at = raw.find(b"\0")
    if at < 0:
        return False
    if on_binary == "error":
        decompressed = " (decompressed)" if compression_of(file) else ""
        raise SourceError(
            f"{place} holds a NUL byte (at byte {offset + at} of {file}{decompressed}): that is binary data, not "
            f"text; remove it from the file, or set data.on_binary=skip to skip the documents that hold NUL bytes "
            f"(they are counted in the manifest)"
        )
    report.nul_documents += 1
    add_count(report.nul_documents_by_file, file, 1)
    return True


def text_holds_nul(text: str, place: str, file: str, on_binary: str, report: DecodeReport) -> bool:
    """holds_nul for text that held no NUL byte as bytes but does as characters: a JSON string's \\u0000 escape,
    a parquet or Hugging Face value."""
    if "\0" not in text:
        return False
    if on_binary == "error":
        raise SourceError(
            f"{place} holds a NUL character (a \\u0000 escape or a NUL in its text field): that is binary data, not "
            f"text; remove it, or set data.on_binary=skip to skip the documents that hold NUL characters (they are "
            f"counted in the manifest)"
        )
    report.nul_documents += 1
    add_count(report.nul_documents_by_file, file, 1)
    return True
