"""The partial directory of a data set being built (`<name>-<fingerprint>.partial/`, under its lock): its state,
what of the partitioning is left to do in it after an interruption, and its publication under the final name.

The state (STATE) holds the digest of the partitioning it was begun for and the sha256 of its tokenizer: a directory
left by another partitioning is emptied (open_state); a partition of this partitioning is done exactly when its record and every
file it names are there at their recorded size (recorded_intact), and the others are done again, their shards
and the temporary files of killed writers deleted first (unfinished).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from data_prep.partition_work import PARTS_DIR, PartitionRecord, record_path, shard_prefix
from data_prep.partitions import Partition
from data_prep.shards import SPLITS, shard_bytes
from pipeline.files import LOCK, write_atomic

STATE = "prepare_state.json"  # in the partial directory: the partitioning's digest and the tokenizer's sha256


def _plan_digest(partitions: list[Partition]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(p) for p in partitions], sort_keys=True).encode()).hexdigest()


def open_state(partial: Path, partitions: list[Partition]) -> dict:
    """The state an interrupted run left for this partitioning, or a fresh one (the directory emptied but the lock)."""
    digest = _plan_digest(partitions)
    try:
        state = json.loads((partial / STATE).read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("plan") != digest:
        for path in partial.iterdir() if partial.is_dir() else []:
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        state = {"plan": digest}
        partial.mkdir(parents=True, exist_ok=True)
        write_atomic(partial / STATE, json.dumps(state))
    return state


def unfinished(partial: Path, partitions: list[Partition], dtype: str) -> list[Partition]:
    """The partitions to (re)do: those without a record, or whose recorded files are missing or not of the
    recorded size. Their shards (a killed run's) and every temporary file a killed writer left are deleted."""
    remove_temporaries(partial)
    todo = [p for p in partitions if not recorded_intact(partial, p.index, dtype)]
    for part in todo:
        record_path(partial, part.index).unlink(missing_ok=True)
        for split in SPLITS:
            for stray in partial.glob(f"{shard_prefix(split, part.index)}-*.bin"):
                stray.unlink()
    return todo


def recorded_intact(partial: Path, index: int, dtype: str) -> bool:
    try:
        record = PartitionRecord.from_json(record_path(partial, index).read_text(), index)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    shards_ok = all((partial / info.file).is_file() and (partial / info.file).stat().st_size == shard_bytes(info, dtype)
                    for infos in record.shards.values() for info in infos)
    parts = [record.token_counts, *record.doc_starts.values()]
    return shards_ok and all((partial / PARTS_DIR / name).is_file() for name in parts if name)


def remove_temporaries(directory: Path) -> None:
    """write_atomic's temporary files (.<name>.tmp<pid>), partial downloads (.<name>.download-<id>) and the
    driver's mark (.driver-<id>) that a killed run left behind."""
    for folder in (directory, directory / PARTS_DIR):
        for pattern in (".*.tmp*", ".*.download-*", ".driver-*"):
            for tmp in folder.glob(pattern) if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)


def publish(partial: Path, out: Path) -> None:
    """Rename the finished partial directory to its final name (the lock is held by the caller)."""
    shutil.rmtree(partial / PARTS_DIR, ignore_errors=True)
    remove_temporaries(partial)
    for name in (STATE, LOCK):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)  # an incomplete leftover (complete ones are found before the lock is taken)
    os.replace(partial, out)
