"""The progress journal of an interrupted prepare, and the lock that keeps two runs out of one directory."""

from __future__ import annotations

import threading
import time

import numpy as np

from data_prep.journal import JOURNAL, Checkpoint, ProgressJournal
from data_prep.shards import TOKENIZER_FILE, ShardWriter, sha256_file
from pipeline.files import LOCK, directory_lock


def checkpoint(segment, train, val):
    return Checkpoint(segment, {"train": train, "validation": val}, {"train": segment, "validation": 0},
                      {"train": [train], "validation": [val]})


def journal_with_shards(tmp_path, n_train=3, save=True):
    (tmp_path / TOKENIZER_FILE).write_bytes(b"model")
    journal = ProgressJournal(tmp_path, {"dataset": "x"}, sha256_file(tmp_path / TOKENIZER_FILE))
    writer = ShardWriter(tmp_path, "train", 4, np.dtype("<u2"), shard_windows=2)
    writer.add(np.arange(4 * 2 * n_train).reshape(-1, 4) % 100)
    journal.shards["train"] = writer.shards
    journal.checkpoints = [checkpoint(0, 0, 0), checkpoint(5, 7, 0), checkpoint(9, 16, 0), checkpoint(12, 23, 2)]
    if save:
        journal.save()
    return journal


def test_restart_point_is_the_latest_checkpoint_before_every_kept_shard_ends(tmp_path):
    journal = journal_with_shards(tmp_path, save=False)  # 3 train shards of 8 tokens: 24 kept, no validation shard
    assert journal.restart_point().segment == 9  # not 12: its 2 validation tokens are in no shard
    journal.shards["train"] = journal.shards["train"][:1]  # 8 tokens kept
    assert journal.restart_point().segment == 5
    journal.shards["train"] = []
    assert journal.restart_point().segment == 0


def test_saving_drops_checkpoints_before_the_restart_point_but_the_start(tmp_path):
    journal = journal_with_shards(tmp_path)
    assert [c.segment for c in journal.checkpoints] == [0, 9, 12]
    journal.shards["train"] = journal.shards["train"][:1]  # a shard found damaged later: back to the start
    assert journal.restart_point().segment == 0


def test_reopened_journal_keeps_good_shards_up_to_the_first_bad_one(tmp_path):
    journal_with_shards(tmp_path)
    reopened = ProgressJournal.open(tmp_path, {"dataset": "x"})
    assert [s.file for s in reopened.shards["train"]] == ["train_00000.bin", "train_00001.bin", "train_00002.bin"]
    data = bytearray((tmp_path / "train_00001.bin").read_bytes())
    data[-1] ^= 1
    (tmp_path / "train_00001.bin").write_bytes(bytes(data))
    assert reopened.verify_shards(np.dtype("<u2")) == 1
    assert [s.file for s in reopened.shards["train"]] == ["train_00000.bin"]
    assert reopened.restart_point().segment == 0  # checkpoint 5 was dropped when 3 shards were kept


def test_a_journal_of_another_corpus_or_a_changed_tokenizer_starts_over(tmp_path):
    journal_with_shards(tmp_path)
    (tmp_path / LOCK).touch()
    fresh = ProgressJournal.open(tmp_path, {"dataset": "x", "documents": "other"})
    assert fresh.shards == {"train": [], "validation": []} and fresh.tokenizer_sha256 is None
    assert [p.name for p in tmp_path.iterdir()] == [LOCK]  # everything else of the old run removed
    journal_with_shards(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_bytes(b"another model")
    assert ProgressJournal.open(tmp_path, {"dataset": "x"}).checkpoints == []
    (tmp_path / JOURNAL).write_text("{not json")
    assert ProgressJournal.open(tmp_path, {"dataset": "x"}).checkpoints == []


def test_second_run_waits_for_the_lock(tmp_path):
    directory = tmp_path / "d.partial"
    events = []

    def second():
        with directory_lock(directory):
            events.append("second has the lock")

    with directory_lock(directory):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        events.append("first releases")
    thread.join(timeout=10)
    assert events == ["first releases", "second has the lock"]
