"""The prepare stage on small corpora: packing, determinism, idempotence, splits, and bad input."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import data_prep.prepare as prepare_module
from data_prep.prepare import DataPrepError, assign_splits, dataset_dir, make_blocks, prepare, split_of
from data_prep.shards import WindowDataset, load_manifest
from data_prep.sources import read_documents
from data_prep.tokenizer import TokenizerError, load_tokenizer
from pipeline.config import DataConfig, TokenizerConfig


def text_config(corpus, out, **kw) -> DataConfig:
    base = dict(name="t", source="text", path=str(corpus), context_length=16, val_fraction=0.1,
                output_dir=str(out), tokenizer=TokenizerConfig(vocab_size=400), num_workers=2,
                shard_tokens=17 * 100)
    return DataConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few documents, so that two actors really share the work on a small corpus."""
    monkeypatch.setattr(prepare_module, "_MIN_BLOCK_CHARS", 2000)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory, ray_local):
    """One data set shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "_MIN_BLOCK_CHARS", 2000)
        cfg = text_config(corpus, tmp_path_factory.mktemp("prepared"), keep_doc_boundaries=True)
        return cfg, prepare(cfg)


def test_windows_are_the_documents_joined_by_eos(prepared):
    cfg, out = prepared
    manifest = load_manifest(out)
    sp = load_tokenizer(manifest.tokenizer_path)
    assert manifest.window_length == 17 and manifest.dtype == "<u2" and manifest.vocab_size == 400
    docs, _ = read_documents(cfg)
    for split in ("train", "validation"):
        ds = WindowDataset(out, split)
        stream = ds.windows(np.arange(len(ds))).reshape(-1).tolist()
        expected = []
        for d in docs:
            if split_of(d, cfg.val_fraction) == split:
                expected += sp.encode(d) + [sp.eos_id()]
        assert len(stream) > 0 and stream == expected[: len(stream)], split
        assert len(expected) - len(stream) == manifest.stats["dropped_tail_tokens"][split] < 17
        assert manifest.stats["tokens"][split] == len(expected)
    assert len(manifest.splits["train"]) > 1  # several shards of at most 100 windows
    assert all(s.n_windows <= 100 for s in manifest.splits["train"])
    n_val = manifest.stats["documents"]["validation"]
    assert 0 < n_val < len(docs) and manifest.stats["documents"]["train"] == len(docs) - n_val
    WindowDataset(out, "train").verify()


def test_doc_starts_point_just_after_each_eos(prepared):
    _, out = prepared
    manifest = load_manifest(out)
    tokens = WindowDataset(out, "train").windows(np.arange(len(WindowDataset(out, "train")))).reshape(-1)
    starts = np.load(out / manifest.doc_starts["train"]["file"])
    expected = np.concatenate([[0], np.flatnonzero(tokens == manifest.eos_id) + 1])
    assert np.array_equal(starts, expected[expected < len(tokens)])


def test_output_is_byte_identical_with_one_or_two_workers(corpus, tmp_path, ray_local):
    cfg = text_config(corpus, tmp_path / "one", num_workers=1)
    assert len(make_blocks(read_documents(cfg)[0], np.zeros(60, bool), 2)) > 4
    one = prepare(cfg)
    two = prepare(dataclasses.replace(cfg, num_workers=2, output_dir=str(tmp_path / "two")))
    assert one.name == two.name  # neither the worker count nor the location is part of the fingerprint
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) and "tokenizer.model" in files
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_rerun_skips_and_changed_config_writes_elsewhere(prepared, caplog):
    cfg, first = prepared
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    with caplog.at_level("INFO", logger="data_prep.prepare"):
        again = prepare(cfg)
    assert again == first and {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    assert "already prepared" in caplog.text and "skipping" in caplog.text
    assert dataset_dir(dataclasses.replace(cfg, context_length=8)) != first
    assert dataset_dir(dataclasses.replace(cfg, val_fraction=0.2)) != first
    assert dataset_dir(dataclasses.replace(cfg, tokenizer=TokenizerConfig(vocab_size=401))) != first
    assert dataset_dir(dataclasses.replace(cfg, num_workers=None)) == first


def test_incomplete_data_set_is_rebuilt(corpus, tmp_path, ray_local):
    cfg = text_config(corpus, tmp_path, shard_tokens=17 * 10_000)
    out = prepare(cfg)
    reference = (out / "train_00000.bin").read_bytes()
    (out / "train_00000.bin").write_bytes(reference[:100])  # as if killed mid-copy
    assert prepare(cfg) == out
    assert (out / "train_00000.bin").read_bytes() == reference
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary directory left


def test_existing_tokenizer_is_reused_and_a_changed_one_refused(prepared, tmp_path, ray_local):
    cfg, first = prepared
    model = tmp_path / "tok.model"
    shutil.copy(first / "tokenizer.model", model)
    reuse = dataclasses.replace(cfg, output_dir=str(tmp_path / "out"), keep_doc_boundaries=False,
                                tokenizer=TokenizerConfig(model_path=str(model)))
    out = prepare(reuse)
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()
    assert (out / "train_00000.bin").read_bytes() == (first / "train_00000.bin").read_bytes()
    model.write_bytes((tmp_path / "out" / out.name / "tokenizer.model").read_bytes() + b"\0")
    with pytest.raises(DataPrepError, match="tok.model has changed since"):
        prepare(reuse)


def test_split_by_hash_does_not_depend_on_order():
    docs = [f"document number {i}" for i in range(400)]
    forward = {d: split_of(d, 0.2) for d in docs}
    assert {d: split_of(d, 0.2) for d in reversed(docs)} == forward
    assert 50 < sum(s == "validation" for s in forward.values()) < 110
    is_val = assign_splits(docs, 0.2)
    assert [forward[d] == "validation" for d in docs] == is_val.tolist()
    assert not assign_splits(docs, 0.0).any()


def test_tiny_corpus_still_gets_both_splits_by_hash():
    docs = ["alpha", "beta", "gamma"]
    for order in (docs, docs[::-1]):
        is_val = assign_splits(order, 0.001)
        assert is_val.sum() == 1
        chosen = order[int(np.flatnonzero(is_val)[0])]
        assert chosen == min(docs, key=prepare_module.hash_fraction)  # the lowest hash, not a position


def test_too_large_vocabulary_fails_before_tokenizing_and_leaves_nothing(corpus, tmp_path, ray_local):
    cfg = text_config(corpus, tmp_path, tokenizer=TokenizerConfig(vocab_size=50_000))
    with pytest.raises(TokenizerError, match="lower data.tokenizer.vocab_size"):
        prepare(cfg)
    assert list(tmp_path.iterdir()) == []


def test_corpus_too_small_for_one_window_is_explained(tmp_path, ray_local):
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(f"the king {i} and the queen of love night day sweet heart")
    cfg = DataConfig(name="t", source="text", path=str(tmp_path / "c"), context_length=512, val_fraction=0.0,
                     output_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(vocab_size=60, byte_fallback=False))
    with pytest.raises(DataPrepError, match="not one complete window of 513 tokens.*lower model.context_length"):
        prepare(cfg)
    assert list((tmp_path / "out").iterdir()) == []


def test_default_config_prepares_the_plays(tmp_path, ray_local):
    """The one test on the full corpus: the shipped defaults (BPE 4096, windows of 129) work end to end."""
    out = prepare(DataConfig(output_dir=str(tmp_path)))
    manifest = load_manifest(out)
    assert (manifest.vocab_size, manifest.window_length, manifest.dtype) == (4096, 129, "<u2")
    assert manifest.source == {"kind": "shakespeare", "path": None, "files": 38}
    stats = manifest.stats
    assert 1_400_000 < stats["tokens"]["train"] < 2_000_000  # about 3 characters per token
    assert 0.02 < stats["documents"]["validation"] / stats["documents"]["train"] < 0.09
    sp = load_tokenizer(manifest.tokenizer_path)
    first = sp.decode(WindowDataset(out, "train").windows(np.array([0]))[0].tolist())
    docs, _ = read_documents(DataConfig())
    assert any(d.startswith(first) for d in docs)  # the first window is the start of a scene, exactly
