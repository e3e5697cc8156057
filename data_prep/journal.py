"""Resuming an interrupted prepare: a progress journal beside the shards, and a lock on the directory.

A data set is built in `<name>-<fingerprint>.partial/`. After every block of the corpus whose processing
completed a shard, the driver rewrites `progress.json` atomically: the shards written so far (name, size,
sha256) and, per block, a checkpoint of the stream (pieces of the corpus consumed, tokens and documents
per split). A re-run of the same config finds the journal, keeps the shards whose size and sha256 still
match (up to the first one that does not), restarts from the latest checkpoint that precedes every kept
shard's end, and drops the tokens that the kept shards already hold. The bytes are those of an
uninterrupted run: the stream is a function of the corpus alone, not of where it was cut.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from data_prep.shards import SPLITS, TOKENIZER_FILE, ShardInfo, sha256_file, shard_bytes
from pipeline.files import LOCK, write_atomic

log = logging.getLogger(__name__)

JOURNAL = "progress.json"


@dataclasses.dataclass
class Checkpoint:
    """The stream after its first `segment` pieces: tokens, documents and tokens per source, per split."""

    segment: int
    tokens: dict[str, int]
    documents: dict[str, int]
    source_tokens: dict[str, list[int]]


@dataclasses.dataclass
class ProgressJournal:
    directory: Path
    # What the shards depend on: the data fingerprint and a digest of the documents read.
    key: dict
    tokenizer_sha256: str | None = None
    shards: dict[str, list[ShardInfo]] = dataclasses.field(default_factory=lambda: {s: [] for s in SPLITS})
    checkpoints: list[Checkpoint] = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, directory: Path, key: dict) -> ProgressJournal:
        """The journal an interrupted run with the same key left in directory, or a fresh one (after
        emptying the directory of anything else but the lock)."""
        directory = Path(directory)
        old = _read(directory / JOURNAL)
        if old is not None and old.get("key") == key:
            journal = cls(directory, key, old.get("tokenizer_sha256"),
                          {s: [ShardInfo(**x) for x in old["shards"].get(s, [])] for s in SPLITS},
                          [Checkpoint(**c) for c in old["checkpoints"]])
            if journal.tokenizer_sha256 and journal._tokenizer_intact():
                return journal
        leftovers = [p for p in directory.iterdir() if p.name != LOCK]
        if leftovers:
            log.info("%s holds an interrupted run of another corpus or recipe: starting it again", directory)
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return cls(directory, key)

    def _tokenizer_intact(self) -> bool:
        path = self.directory / TOKENIZER_FILE
        return path.is_file() and sha256_file(path) == self.tokenizer_sha256

    def verify_shards(self, dtype) -> int:
        """Keep, per split, the shards whose size and sha256 match, up to the first that does not; return
        how many were kept."""
        kept = 0
        for split in SPLITS:
            good = []
            for info in self.shards[split]:
                path = self.directory / info.file
                intact = path.is_file() and path.stat().st_size == shard_bytes(info, dtype)
                if not intact or sha256_file(path) != info.sha256:
                    log.info("%s does not match the journal: writing it and the %s shards after it again",
                             path, split)
                    break
                good.append(info)
            self.shards[split] = good
            kept += len(good)
        return kept

    def restart_point(self) -> Checkpoint:
        """The latest checkpoint whose stream ends, in every split, no later than the kept shards do."""
        done = {s: sum(x.n_tokens for x in self.shards[s]) for s in SPLITS}
        usable = [c for c in self.checkpoints if all(c.tokens[s] <= done[s] for s in SPLITS)]
        if not usable:  # no block done yet
            return Checkpoint(0, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, {s: [] for s in SPLITS})
        return max(usable, key=lambda c: c.segment)

    def save(self) -> None:
        """Write the journal atomically. Checkpoints before the current restart point are dropped (all but the
        start of the stream, the fallback should a kept shard be found damaged later), so the journal stays
        small however long the corpus."""
        keep_from = self.restart_point().segment
        self.checkpoints = [c for c in self.checkpoints if c.segment == 0 or c.segment >= keep_from]
        record = {
            "key": self.key,
            "tokenizer_sha256": self.tokenizer_sha256,
            "shards": {s: [dataclasses.asdict(x) for x in self.shards[s]] for s in SPLITS},
            "checkpoints": [dataclasses.asdict(c) for c in self.checkpoints],
        }
        write_atomic(self.directory / JOURNAL, json.dumps(record))


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not {"key", "shards", "checkpoints"} <= record.keys():
        return None
    return record
