"""The prepare stage on small corpora: determinism, idempotence, splits, and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from data_prep.prepare import dataset_dir, prepare, split_of
from data_prep.shards import WindowDataset, load_manifest
from data_prep.sources import SourceError, read_documents
from data_prep.tokenizer import load_tokenizer
from pipeline.config import DataConfig, TokenizerConfig

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "I", "this", "are", "or", "his", "from", "at", "which"]


def write_corpus(root, n_docs=60, lines=12):
    import random

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines))
        (root / f"doc_{i:03d}.txt").write_text(text)
    return root


def text_config(tmp_path, **kw) -> DataConfig:
    corpus = write_corpus(tmp_path / "corpus")
    base = dict(name="t", source="text", path=str(corpus), context_length=16, val_fraction=0.1,
                output_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(vocab_size=300), num_workers=1)
    return DataConfig(**{**base, **kw})


def test_output_is_byte_identical_with_one_or_two_workers(tmp_path, ray_local):
    one = prepare(text_config(tmp_path, num_workers=1, output_dir=str(tmp_path / "one")))
    two = prepare(text_config(tmp_path, num_workers=2, output_dir=str(tmp_path / "two")))
    assert one.name == two.name  # the worker count is not part of the fingerprint
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_windows_hold_documents_separated_by_eos(tmp_path, ray_local):
    cfg = text_config(tmp_path)
    out = prepare(cfg)
    manifest = load_manifest(out)
    sp = load_tokenizer(manifest.tokenizer_path)
    assert manifest.window_length == 17
    train = WindowDataset(out, "train")
    stream = train.windows(range(len(train))).reshape(-1).tolist()
    docs, _ = read_documents(cfg)
    train_docs = [d for d in docs if split_of(d, cfg.val_fraction) == "train"]
    expected = []
    for d in train_docs:
        expected += sp.encode(d) + [sp.eos_id()]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) == manifest.stats["dropped_tail_tokens"]["train"] < 17
    assert manifest.stats["documents"]["validation"] == len(docs) - len(train_docs) > 0
    WindowDataset(out, "train").verify()


def test_rerun_skips_and_changed_config_writes_elsewhere(tmp_path, ray_local, caplog):
    cfg = text_config(tmp_path)
    first = prepare(cfg)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        again = prepare(cfg)
    assert again == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    assert "already prepared" in caplog.text
    changed = prepare(dataclasses.replace(cfg, context_length=8))
    assert changed != first and changed.parent == first.parent
    assert json.loads((first / "manifest.json").read_text())["window_length"] == 17


def test_split_by_hash_does_not_depend_on_order():
    docs = [f"document number {i}" for i in range(200)]
    forward = {d: split_of(d, 0.2) for d in docs}
    assert {d: split_of(d, 0.2) for d in reversed(docs)} == forward
    assert 20 < sum(s == "validation" for s in forward.values()) < 60


def test_tokenizer_round_trips_text_with_line_breaks(tmp_path, ray_local):
    out = prepare(text_config(tmp_path))
    sp = load_tokenizer(load_manifest(out).tokenizer_path)
    text = "the of and\nto in  a\n\nis that é ü 漢"  # unseen characters go through byte fallback
    assert sp.decode(sp.encode(text)) == text


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "empty"), output_dir=str(tmp_path / "out"))
    with pytest.raises(SourceError, match="holds no non-empty document"):
        read_documents(cfg)


def test_undecodable_bytes_are_counted_and_replaced_or_skipped(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "good.txt").write_text("fine text")
    (corpus / "bad.txt").write_bytes(b"broken \xff\xfe bytes")
    docs, report = read_documents(DataConfig(source="text", path=str(corpus)))
    assert report.bad_bytes_documents == 1 and "broken \ufffd\ufffd bytes" in docs
    docs, report = read_documents(DataConfig(source="text", path=str(corpus), on_decode_error="skip"))
    assert docs == ["fine text"] and report.skipped_documents == 1


def test_too_large_vocabulary_is_explained(tmp_path, ray_local):
    cfg = text_config(tmp_path, tokenizer=TokenizerConfig(vocab_size=50_000))
    with pytest.raises(ValueError, match="lower data.tokenizer.vocab_size"):
        prepare(cfg)
    assert not dataset_dir(cfg).exists()
    assert not any(p.name.startswith(dataset_dir(cfg).name) for p in (tmp_path / "out").iterdir())


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    docs, _ = read_documents(DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl"), text_field="body"))
    assert docs == ["one", "two"]
    with pytest.raises(SourceError, match="no field 'text'"):
        read_documents(DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl")))
    pq.write_table(pa.table({"text": ["x", "y", ""]}), tmp_path / "b.parquet")
    docs, _ = read_documents(DataConfig(source="parquet", path=str(tmp_path / "b.parquet")))
    assert docs == ["x", "y"]


def test_shakespeare_splits_into_scenes():
    docs, _ = read_documents(DataConfig())
    assert 700 < len(docs) < 900
    assert any(d.startswith("# Hamlet") for d in docs)
    assert all("  \n" not in d for d in docs[:50])


def test_inspect_reports_counts_and_verifies(tmp_path, ray_local, capsys):
    from data_prep.inspect import main as inspect_main

    out = prepare(text_config(tmp_path))
    assert inspect_main([str(out), "--verify"]) == 0
    report = capsys.readouterr().out
    assert "train:" in report and "validation:" in report and "every shard matches" in report
    shard = out / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert inspect_main([str(out), "--verify"]) == 1
    assert "train_00000.bin fails its checksum" in capsys.readouterr().err
