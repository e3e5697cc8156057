"""Partitioned prepare: the plan, the inputs real corpora come in, and a resume after a real kill -9."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpora import WORDS

from data_prep.errors import SourceError
from data_prep.mixture import read_documents
from data_prep.partitions import partition_inputs
from pipeline.config import DataConfig


def jsonl_corpus(root: Path, files: int, docs_per_file: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(root / f"part-{f:03d}.jsonl", "w") as out:
            for _ in range(docs_per_file):
                lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(rng.randint(1, 6))]
                out.write(json.dumps({"text": "\n".join(lines), "id": rng.random()}) + "\n")
    return root


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("partition_bytes", [997, 4096, 50_000, 1 << 26])
def test_byte_ranges_cover_every_line_once(tmp_path, partition_bytes):
    """A line belongs to the range that holds its first byte: whatever the cut, the documents are those of
    the whole file, in order."""
    root = jsonl_corpus(tmp_path / "c", files=2, docs_per_file=300)
    whole = read_documents(DataConfig(source="jsonl", path=str(root)))[0]
    cfg = DataConfig(source="jsonl", path=str(root), partition_bytes=partition_bytes)
    plan = partition_inputs(cfg)
    assert [p.index for p in plan] == list(range(len(plan)))
    if partition_bytes < 50_000:
        assert len(plan) > 2 * 2  # both files cut into several ranges
    assert read_documents(cfg)[0] == whole


def test_gzip_and_zstd_inputs_read_as_the_plain_file(tmp_path):
    import pyarrow as pa

    plain = jsonl_corpus(tmp_path / "plain", files=1, docs_per_file=200)
    raw = (plain / "part-000.jsonl").read_bytes()
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    with pa.CompressedOutputStream(str(packed / "b.jsonl.zst"), "zstd") as out:
        out.write(raw)
    expected = read_documents(DataConfig(source="jsonl", path=str(plain)))[0]
    assert read_documents(DataConfig(source="jsonl", path=str(packed)))[0] == expected + expected
    # Compressed files are never cut into byte ranges.
    assert len(partition_inputs(DataConfig(source="jsonl", path=str(packed), partition_bytes=100))) == 2


def test_binary_files_are_skipped_and_counted_or_refused(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("a line of text\nanother one\n")
    (root / "model.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + os.urandom(4000))
    docs, report = read_documents(DataConfig(source="text", path=str(root), doc_split="line"))
    assert docs == ["a line of text", "another one"]
    assert report.binary_files == [str(root / "model.txt")]
    with pytest.raises(SourceError, match=r"model\.txt is a binary file.*data\.on_binary=skip"):
        read_documents(DataConfig(source="text", path=str(root), doc_split="line", on_binary="error"))


def test_truncated_gzip_and_missing_column_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "gz"
    root.mkdir()
    whole = gzip.compress(b'{"text": "hello"}\n' * 5000)
    (root / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SourceError, match=r"cut\.jsonl\.gz cannot be read.*truncated or corrupt"):
        read_documents(DataConfig(source="jsonl", path=str(root)))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match=r"t\.parquet has no column 'text'.*data\.text_field"):
        partition_inputs(DataConfig(source="parquet", path=str(tmp_path / "t.parquet")))  # before any reading


def prepare_command(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "prepare", f"output_dir={out}", "data.source=jsonl",
            f"data.path={corpus}", "data.partition_bytes=250000", "data.tokenizer.vocab_size=300",
            "data.tokenizer.sample_sentences=2000", "data.tokenize_engine=actors", *extra]


@pytest.mark.distributed
def test_kill_9_during_prepare_then_the_same_command_finishes_with_the_same_bytes(tmp_path):
    """A real SIGKILL of the driver half-way (after some partitions finished); the same command again keeps the
    finished partitions, redoes the rest, and writes exactly the bytes of an uninterrupted run. The corpus has
    far more lines than the tokenizer's sample, and the two runs use 1 and 2 workers."""
    corpus = jsonl_corpus(tmp_path / "corpus", files=24, docs_per_file=5000)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    reference = tmp_path / "reference"
    subprocess.run(prepare_command(reference, corpus, "data.num_workers=1"), check=True, env=env,
                   capture_output=True, text=True, timeout=600)
    (ref_dir,) = (reference / "data").iterdir()
    assert len(json.loads((ref_dir / "manifest.json").read_text())["splits"]["train"]) >= 8

    out = tmp_path / "killed"
    proc = subprocess.Popen(prepare_command(out, corpus, "data.num_workers=2"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            records = list((out / "data").glob("*.partial/parts/p*.json"))
            if len(records) >= 5:
                break
            assert proc.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes of the killed run, had any survived it
    (partial,) = (out / "data").glob("*.partial")
    assert not (partial / "manifest.json").exists()
    done_before = len(list((partial / "parts").glob("p*.json")))
    rerun = subprocess.run(prepare_command(out, corpus, "data.num_workers=2"), env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = re.search(r"resuming an interrupted run: (\d+) of (\d+) partitions are done", rerun.stderr)
    assert resumed, rerun.stderr[-3000:]
    # Kept what the killed run finished (its surviving workers may have finished a few more meanwhile).
    assert done_before <= int(resumed.group(1)) < int(resumed.group(2))
    (final,) = [d for d in (out / "data").iterdir() if not d.name.endswith(".partial")]
    assert final.name == ref_dir.name
    assert digests(final) == digests(ref_dir)
