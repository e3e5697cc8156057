"""What reading a corpus met, counted as it reads: the DecodeReport (undecodable bytes, documents and files
skipped for NUL bytes, links skipped for leaving the corpus root), bounded however many files are damaged, and its
summary in the log naming the files with the most of each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Files named per count in the log and the manifest (those with the most first).
REPORTED_FILES = 20


# Files a report keeps counts for: beyond twice this, those with the least are dropped (their counts stay in
# the totals), so that a corpus of millions of damaged files cannot grow a report without bound.
KEPT_FILES = 10_000


def add_count(counts: dict[str, int], name: str, n: int) -> None:
    """counts[name] += n, keeping at most 2 x KEPT_FILES names (see KEPT_FILES)."""
    counts[name] = counts.get(name, 0) + n
    if len(counts) > 2 * KEPT_FILES:
        kept = most(counts, KEPT_FILES)
        counts.clear()
        counts.update(kept)


def most(counts: dict[str, int], n: int) -> dict[str, int]:
    """The n names of largest count, largest first (ties by name, so that the choice is deterministic)."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n])


@dataclass
class DecodeReport:
    """What reading met: files read; undecodable bytes (replaced by U+FFFD, or their documents skipped), also per
    file; documents skipped for NUL bytes, also per file; binary files skipped; and the symbolic links that
    listing the corpus skipped for leaving its root (link -> target; found on the driver, never by workers)."""

    files: int = 0
    bad_bytes: int = 0
    bad_bytes_documents: int = 0
    skipped_documents: int = 0
    binary_files: list[str] = field(default_factory=list)  # skipped (data.on_binary=skip)
    bad_bytes_by_file: dict[str, int] = field(default_factory=dict)
    nul_documents: int = 0  # skipped (data.on_binary=skip)
    nul_documents_by_file: dict[str, int] = field(default_factory=dict)
    outside_links: dict[str, str] = field(default_factory=dict)  # skipped (data.on_outside_link=skip)

    def add(self, other: DecodeReport) -> None:
        self.files += other.files
        self.bad_bytes += other.bad_bytes
        self.bad_bytes_documents += other.bad_bytes_documents
        self.skipped_documents += other.skipped_documents
        self.binary_files.extend(f for f in other.binary_files if f not in self.binary_files)
        for name, n in other.bad_bytes_by_file.items():
            add_count(self.bad_bytes_by_file, name, n)
        self.nul_documents += other.nul_documents
        for name, n in other.nul_documents_by_file.items():
            add_count(self.nul_documents_by_file, name, n)
        self.outside_links.update(other.outside_links)

    def log_summary(self) -> None:
        """Warnings for what reading skipped or replaced, naming the files with the most of it."""
        if self.outside_links:
            log.warning("skipped %d symbolic links whose targets lie outside the corpus root (data.on_outside_link="
                        "skip; listed in the manifest)", len(self.outside_links))
        if self.nul_documents:
            log.warning("skipped %d documents holding NUL bytes (binary data inside text; data.on_binary=skip), "
                        "by file:", self.nul_documents)
            _log_most(self.nul_documents_by_file, "documents")
        if self.bad_bytes_documents:
            log.warning(
                "%d undecodable bytes (not UTF-8) in %d documents; %s; by file:",
                self.bad_bytes, self.bad_bytes_documents,
                f"skipped {self.skipped_documents} of them (data.on_decode_error=skip)" if self.skipped_documents
                else "replaced by U+FFFD (data.on_decode_error=replace)",
            )
            _log_most(self.bad_bytes_by_file, "undecodable bytes")


def _log_most(counts: dict[str, int], unit: str) -> None:
    """One line per file for the REPORTED_FILES files of largest count, then one for the rest."""
    top = most(counts, REPORTED_FILES)
    for name, n in top.items():
        log.warning("  %s: %d %s", name, n, unit)
    if len(counts) > len(top):
        log.warning("  and %d more files: %d %s", len(counts) - len(top), sum(counts.values()) - sum(top.values()),
                    unit)
