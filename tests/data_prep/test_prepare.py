"""The prepare stage on small corpora: packing, determinism, idempotence, splits, and bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import shutil
import sys
import time

import numpy as np
import pytest

import data_prep.encoding as encoding_module
import data_prep.prepare as prepare_module
from data_prep.encoding import RAY_DATA_MIN_CHARS_PER_WORKER, make_blocks, make_segments, tokenize_engine
from data_prep.journal import ProgressJournal
from data_prep.mixture import read_documents
from data_prep.prepare import DataPrepError, assign_splits, dataset_dir, prepare, split_of
from data_prep.shards import WindowDataset, load_manifest
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
    monkeypatch.setattr(encoding_module, "_MIN_BLOCK_CHARS", 2000)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory, ray_local):
    """One data set shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoding_module, "_MIN_BLOCK_CHARS", 2000)
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


def test_output_is_byte_identical_with_one_or_two_workers_and_either_engine(corpus, tmp_path, ray_local, caplog):
    cfg = text_config(corpus, tmp_path / "one", num_workers=1, tokenize_engine="actors")
    assert len(make_blocks(make_segments(read_documents(cfg)[0], cut=True), np.zeros(60, bool), 2)) > 4
    one = prepare(cfg)
    two = prepare(dataclasses.replace(cfg, num_workers=2, output_dir=str(tmp_path / "two")))
    with caplog.at_level("INFO", logger="data_prep.prepare"):
        ray_data = prepare(dataclasses.replace(cfg, num_workers=2, tokenize_engine="ray_data",
                                               output_dir=str(tmp_path / "ray_data")))
    assert "with 2 Ray actors (ray_data)" in caplog.text
    # Neither the worker count, the engine nor the location is part of the fingerprint.
    assert one.name == two.name == ray_data.name
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) == sorted(p.name for p in ray_data.iterdir())
    assert "tokenizer.model" in files
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes() == (ray_data / name).read_bytes(), name


def test_auto_engine_is_ray_data_for_large_corpora():
    per_worker = RAY_DATA_MIN_CHARS_PER_WORKER
    assert tokenize_engine("auto", 2 * per_worker, 2) == "ray_data"
    assert tokenize_engine("auto", 2 * per_worker - 1, 2) == "actors"
    assert tokenize_engine("auto", 2 * per_worker, 4) == "actors"  # more actors encode it faster: plain ones
    assert tokenize_engine("ray_data", 10, 2) == "ray_data" and tokenize_engine("actors", 1 << 40, 2) == "actors"


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
    assert (manifest.source["kind"], manifest.source["path"], manifest.source["files"]) == ("shakespeare", None, 38)
    stats = manifest.stats
    [plays] = manifest.source["sources"]
    assert plays["documents"] == plays["documents_read"] == sum(stats["documents"].values())
    assert sum(plays["tokens"].values()) == sum(stats["tokens"].values()) and plays["token_share"] == 1.0
    assert 1_400_000 < stats["tokens"]["train"] < 2_000_000  # about 3 characters per token
    assert 0.02 < stats["documents"]["validation"] / stats["documents"]["train"] < 0.09
    sp = load_tokenizer(manifest.tokenizer_path)
    first = sp.decode(WindowDataset(out, "train").windows(np.array([0]))[0].tolist())
    docs, _ = read_documents(DataConfig())
    assert any(d.startswith(first) for d in docs)  # the first window is the start of a scene, exactly


class SimulatedCrash(RuntimeError):
    """Stands for a kill: raised right after the progress journal was written."""


def test_interrupted_run_resumes_from_its_shards_and_writes_the_same_bytes(corpus, tmp_path, ray_local, monkeypatch,
                                                                         caplog):
    cfg = text_config(corpus, tmp_path / "run", shard_tokens=17 * 20, keep_doc_boundaries=True)
    reference = prepare(dataclasses.replace(cfg, output_dir=str(tmp_path / "reference")))
    original_save = ProgressJournal.save

    def save_then_crash(journal):
        original_save(journal)
        if len(journal.shards["train"]) >= 6:
            raise SimulatedCrash("killed after the journal recorded 6 shards")

    monkeypatch.setattr(ProgressJournal, "save", save_then_crash)
    with pytest.raises(SimulatedCrash):
        prepare(cfg)
    monkeypatch.setattr(ProgressJournal, "save", original_save)
    out = dataset_dir(cfg)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and (partial / "progress.json").is_file()
    journal = json.loads((partial / "progress.json").read_text())
    journaled = {s: [x["file"] for x in journal["shards"][s]] for s in ("train", "validation")}
    assert len(journaled["train"]) >= 6
    # The last journaled training shard is damaged meanwhile: it and those after it are written again.
    damaged = journaled["train"][-1]
    data = bytearray((partial / damaged).read_bytes())
    data[-1] ^= 0xFF
    (partial / damaged).write_bytes(bytes(data))
    reused = len(journaled["train"]) - 1 + len(journaled["validation"])

    monkeypatch.setattr(prepare_module, "_PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level("INFO", logger="data_prep"):
        assert prepare(dataclasses.replace(cfg, num_workers=1)) == out  # another worker count, same bytes
    assert f"reused {reused} complete shards" in caplog.text
    assert f"{damaged} does not match the journal" in caplog.text
    assert "reusing the tokenizer of the interrupted run" in caplog.text
    restart = int(re.search(r"tokenizing again from piece (\d+)", caplog.text).group(1))
    assert restart > 0  # not from the start
    assert re.search(r"tokenized [\d.]+% of the corpus: \d+ tokens \(\d+ tokens/s\)", caplog.text)
    assert not partial.exists()
    files = sorted(p.name for p in reference.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_50_mb_single_line_document_is_encoded_in_pieces_across_the_actors(prepared, tmp_path, ray_local, caplog):
    from conftest import WORDS

    _, first = prepared
    rng = random.Random(0)
    text = " ".join(rng.choices(WORDS, k=12_200_000))
    assert len(text) >= 50_000_000 and "\n" not in text
    (tmp_path / "big.txt").write_text(text)
    cfg = DataConfig(name="big", source="text", path=str(tmp_path / "big.txt"), doc_split="line", val_fraction=0.0,
                     context_length=128, output_dir=str(tmp_path / "out"), num_workers=2,
                     tokenizer=TokenizerConfig(model_path=str(first / "tokenizer.model")))
    with caplog.at_level("INFO", logger="data_prep"):
        out = prepare(cfg)
    pieces = int(re.search(r"1 documents longer than \d+ characters are encoded in (\d+) pieces", caplog.text).group(1))
    assert pieces >= 40
    manifest = load_manifest(out)
    stats = manifest.stats
    assert stats["documents"] == {"train": 1, "validation": 0}
    assert stats["tokens"]["train"] == stats["windows"]["train"] * 129 + stats["dropped_tail_tokens"]["train"]
    sp = load_tokenizer(out / "tokenizer.model")
    train = WindowDataset(out, "train")
    head = sp.decode(train.windows(np.arange(50)).reshape(-1).tolist())
    assert text.startswith(head)
    last = train.windows(np.array([len(train) - 1]))[0].tolist()
    tail = sp.decode([t for t in last if t != manifest.eos_id])
    assert text.rfind(tail) >= len(text) - 2 * 129 * 8  # the pieces come back in order, up to the end
    assert sum(int((shard == manifest.eos_id).sum()) for shard in train.arrays) <= 1  # one EOS, at the very end


def test_vocabulary_beyond_uint16_gives_uint32_shards_end_to_end(prepared, tmp_path, ray_local):
    from sentencepiece import sentencepiece_model_pb2

    _, first = prepared
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((first / "tokenizer.model").read_bytes())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    for i in range(66_000):  # user-defined pieces: matched whole wherever the text holds them
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = f"<w{i}>", 0.0, user_defined
    (tmp_path / "big_vocab.model").write_bytes(model.SerializeToString())
    (tmp_path / "c").mkdir()
    rng = random.Random(0)
    for d in range(20):
        words = [f"<w{rng.randrange(66_000)}>" if rng.random() < 0.3 else rng.choice(["the", "king", "love"])
                 for _ in range(200)]
        (tmp_path / "c" / f"{d}.txt").write_text(" ".join(words))
    cfg = DataConfig(name="wide", source="text", path=str(tmp_path / "c"), context_length=16, val_fraction=0.1,
                     output_dir=str(tmp_path / "out"),
                     tokenizer=TokenizerConfig(model_path=str(tmp_path / "big_vocab.model")))
    out = prepare(cfg)
    manifest = load_manifest(out)
    assert manifest.vocab_size == 400 + 66_000 and manifest.dtype == "<u4"
    train = WindowDataset(out, "train")
    tokens = train.windows(np.arange(len(train)))
    assert tokens.max() > 65_535
    sp = load_tokenizer(out / "tokenizer.model")
    docs = {p.read_text() for p in (tmp_path / "c").iterdir()}
    first_doc = sp.decode(tokens.reshape(-1)[: list(tokens.reshape(-1)).index(manifest.eos_id)].tolist())
    assert first_doc in docs
    assert (out / "train_00000.bin").stat().st_size == 64 + 4 * train.shards[0].n_tokens


def test_progress_bar_shows_tokens_per_second_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = prepare_module.TokenizeProgress(total_chars=1000, done_chars=100)
    time.sleep(0.2)  # past tqdm's minimum refresh interval
    progress.update(400, 2_000_000)
    progress.close()
    shown = terminal.getvalue()
    assert "tokenize" in shown and "50%" in shown and re.search(r"[\d.]+M tokens/s", shown)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar (the log line remains)
    quiet = prepare_module.TokenizeProgress(total_chars=1000, done_chars=0)
    quiet.update(1000, 10)
    quiet.close()
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_undecodable_bytes_are_counted_in_the_manifest(corpus, tmp_path, ray_local, policy):
    shutil.copytree(corpus, tmp_path / "c")
    (tmp_path / "c" / "broken.txt").write_bytes(b"the king \xff\xfe and the \xc3\x28 queen " * 20)
    out = prepare(text_config(tmp_path / "c", tmp_path / "out", on_decode_error=policy))
    stats = load_manifest(out).stats
    assert (stats["undecodable_bytes"], stats["undecodable_documents"]) == (60, 1)
    assert stats["skipped_documents"] == (1 if policy == "skip" else 0)
    assert sum(stats["documents"].values()) == 60 + (policy == "replace")


def test_a_unigram_tokenizer_gives_the_same_tokens_for_documents_cut_in_pieces(corpus, tmp_path, ray_local,
                                                                               monkeypatch, caplog):
    """data.tokenizer.type=unigram end to end; documents longer than the piece size are cut before spaces and
    still give the tokens of the whole document (pieces never span a space for a model split at whitespace)."""
    monkeypatch.setattr(encoding_module, "_SEGMENT_CHARS", 300)
    cfg = text_config(corpus, tmp_path, val_fraction=0.0, tokenizer=TokenizerConfig(type="unigram", vocab_size=340))
    with caplog.at_level("INFO", logger="data_prep"):
        out = prepare(cfg)
    assert re.search(r"\d+ documents longer than 300 characters are encoded in \d+ pieces", caplog.text)
    manifest = load_manifest(out)
    sp = load_tokenizer(manifest.tokenizer_path)
    assert sp.serialized_model_proto() == (out / "tokenizer.model").read_bytes()
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(sp.serialized_model_proto())
    assert model.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    docs, _ = read_documents(cfg)
    assert max(len(d) for d in docs) > 300
    expected = [t for d in docs for t in [*sp.encode(d), sp.eos_id()]]
    ds = WindowDataset(out, "train")
    stream = ds.windows(np.arange(len(ds))).reshape(-1).tolist()
    assert len(stream) > 0 and stream == expected[: len(stream)]
    assert manifest.stats["tokens"]["train"] == len(expected)
