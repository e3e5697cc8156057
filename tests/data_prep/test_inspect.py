"""`pipeline data inspect`: counts, histogram, decoded windows; --verify names a damaged shard."""

from __future__ import annotations

import shutil

import pytest

from data_prep.inspect import main as inspect_main
from data_prep.prepare import prepare
from pipeline.config import DataConfig, TokenizerConfig


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory, ray_local):
    cfg = DataConfig(name="t", source="text", path=str(corpus), context_length=16, val_fraction=0.1,
                     output_dir=str(tmp_path_factory.mktemp("inspect")), tokenizer=TokenizerConfig(vocab_size=400))
    return prepare(cfg)


def test_inspect_reports_counts_histogram_and_windows(dataset, capsys):
    assert inspect_main([str(dataset), "--verify", "--windows", "1"]) == 0
    report = capsys.readouterr().out
    assert "train: " in report and "validation: " in report and "documents" in report
    assert "token histogram" in report and "'\\n'" in report  # line breaks are among the frequent pieces
    assert "--- train window 0 ---" in report and "--- train window 1 ---" not in report
    assert "every shard matches" in report


def test_verify_names_the_corrupted_shard(dataset, tmp_path, capsys):
    copy = shutil.copytree(dataset, tmp_path / "copy")
    shard = copy / "validation-p000000-000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert inspect_main([str(copy)]) == 0  # sizes are fine: only --verify reads every byte
    capsys.readouterr()
    assert inspect_main([str(copy), "--verify"]) == 1
    assert "validation-p000000-000.bin fails its checksum" in capsys.readouterr().err


def test_truncated_shard_and_missing_manifest_exit_non_zero(dataset, tmp_path, capsys):
    copy = shutil.copytree(dataset, tmp_path / "copy")
    shard = copy / "train-p000000-000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    assert inspect_main([str(copy), "--verify"]) == 1
    assert "train-p000000-000.bin is truncated" in capsys.readouterr().err
    assert inspect_main([str(tmp_path / "nothing")]) == 1
    assert "no manifest.json" in capsys.readouterr().err
