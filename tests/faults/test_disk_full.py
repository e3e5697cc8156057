"""A device that fills up while prepare writes shards and while training writes a checkpoint: a real tmpfs of a
few MiB (mounted for the test; this needs root, as on the CI machine). The command stops with a message that
names the file and the fix; the data set and the checkpoint that were complete before are untouched; nothing
half-written is taken as complete; with room again, the same command finishes."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from corpora import make_corpus

from data_prep.shards import verify_dataset
from pipeline.checkpoint.layout import complete_tags, latest_complete, verify_checkpoint

pytestmark = pytest.mark.distributed

SMALL = ["data.tokenizer.vocab_size=400", "data.context_length=32", "model.context_length=32"]


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int):
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (run the suite as root): {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def grow(path: Path, size_mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(path)], check=True)


def pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_full_device_while_writing_shards(tmp_path):
    small_corpus = make_corpus(tmp_path / "notes", n_docs=40)
    mlflow = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    with tmpfs(tmp_path / "disk", 3) as disk:
        first = pipeline("prepare", *SMALL, "data=text_files", f"data.path={small_corpus}", f"output_dir={disk}",
                         mlflow, cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        (before,) = list((disk / "data").iterdir())
        kept = digests(before)
        # The plays need about 5 MiB of shards: the device fills up half-way.
        full = pipeline("prepare", *SMALL, "data.partition_bytes=500000", f"output_dir={disk}", mlflow, cwd=tmp_path)
        assert full.returncode != 0
        assert "no space left on the device while writing" in full.stderr and str(disk) in full.stderr, \
            full.stderr[-3000:]
        assert "run the same command again" in full.stderr
        (said,) = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert "no space left" in said and "ray::" not in said  # the worker's error, not Ray's wrapper of it
        assert digests(before) == kept and verify_dataset(before) == []  # the complete data set is untouched
        partial = [p for p in (disk / "data").iterdir() if p.name.endswith(".partial")]
        assert len(partial) == 1 and not (partial[0] / "manifest.json").exists()
        assert not list(partial[0].glob(".*.tmp*"))  # no half-written file left
        grow(disk, 64)
        again = pipeline("prepare", *SMALL, "data.partition_bytes=500000", f"output_dir={disk}", mlflow, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming an interrupted run" in again.stderr
        clean = pipeline("prepare", *SMALL, "data.partition_bytes=500000", f"output_dir={tmp_path / 'clean'}",
                         mlflow, cwd=tmp_path)
        assert clean.returncode == 0, clean.stderr[-3000:]
        (done,) = [p for p in (disk / "data").iterdir() if p != before]
        assert digests(done) == digests(next((tmp_path / "clean" / "data").iterdir()))


def test_a_full_device_while_writing_a_checkpoint(tmp_path):
    run = [*SMALL, "model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.d_ff=256",
           "train.max_steps=30", "train.warmup_steps=5", "train.save_interval_steps=10", "train.keep_last_checkpoints=5",
           "train.micro_batch_size=4", "train.global_batch_tokens=256", "train.max_failures=0",
           "parallel.num_workers=2", "parallel.precision=fp32", f"data.output_dir={tmp_path / 'data'}",
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "run_name=full"]
    with tmpfs(tmp_path / "disk", 3) as disk:
        full = pipeline("train", *run, f"output_dir={disk}", cwd=tmp_path)
        assert full.returncode != 0
        output = full.stdout + full.stderr
        assert "no space left on the device while writing" in output and str(disk) in output, output[-4000:]
        root = disk / "runs" / "full" / "checkpoints"
        tags = complete_tags(root)
        assert tags and latest_complete(root).name == tags[-1]
        verify_checkpoint(root / tags[-1], content=True)  # the last complete checkpoint is whole
        half = [p for p in root.glob("step_*") if p.name not in tags]
        assert half and not any((p / "COMPLETE").exists() for p in half)  # never taken as complete
        grow(disk, 64)
        again = pipeline("train", *run, f"output_dir={disk}", cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-4000:]
        assert f"resumed from {root / tags[-1]}" in again.stdout + again.stderr
        assert latest_complete(root).name == "step_00000030"
