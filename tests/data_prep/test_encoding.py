"""Cutting the corpus for the actors: long documents in pieces whose BPE tokens are the whole document's,
blocks that cover every piece once and in order, and the actor's stream (EOS only after a document's end)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sentencepiece as spm

import data_prep.encoding as encoding_module
from data_prep.encoding import TokenizeBlock, can_cut_documents, cut_points, make_blocks, make_segments
from data_prep.tokenizer import load_tokenizer, train_tokenizer, training_sentences
from pipeline.config import TokenizerConfig


@pytest.fixture(scope="module")
def bpe_path(corpus, tmp_path_factory):
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    return train_tokenizer(docs, TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("tok") / "t.model", 1)


def long_text(chars: int, seed: int = 0) -> str:
    from conftest import WORDS

    rng = random.Random(seed)
    parts, size = [], 0
    while size < chars:
        word = rng.choice(WORDS) + rng.choice([" ", " ", " ", "  ", "\n", ", ", "   \n    "])
        parts.append(word)
        size += len(word)
    return "".join(parts)


def test_cut_points_fall_before_a_space_that_follows_a_non_space():
    text = long_text(50_000)
    cuts = cut_points(text, 1000)
    bounds = [0, *cuts, len(text)]
    assert all(0 < b - a <= 1000 for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(text[c] == " " and text[c - 1] != " " for c in cuts)
    # No space at all: hard cuts at the piece length.
    assert cut_points("x" * 2500, 1000) == [1000, 2000]
    assert cut_points("short", 1000) == []


def test_pieces_of_a_long_document_encode_to_the_whole_documents_bpe_tokens(bpe_path):
    sp = load_tokenizer(bpe_path)
    assert can_cut_documents(sp.serialized_model_proto())
    text = long_text(300_000, seed=1)
    segments = make_segments(["short one", text, "another"], cut=True, segment_chars=5000)
    assert len(segments) > 60 and "".join(segments.texts[1:-1]) == text
    assert segments.document.tolist() == [0] + [1] * (len(segments) - 2) + [2]
    assert segments.ends_document.tolist() == [True] + [False] * (len(segments) - 3) + [True, True]
    pieces = [t for ids in sp.encode(segments.texts[1:-1]) for t in ids]
    assert pieces == sp.encode(text)
    # The actor joins them: one EOS, after the document's last piece only.
    actor = TokenizeBlock(sp.serialized_model_proto(), "<u2")
    stream, lengths = actor.encode(segments.texts, segments.ends_document.tolist())
    eos = sp.eos_id()
    expected = sp.encode("short one") + [eos] + sp.encode(text) + [eos] + sp.encode("another") + [eos]
    assert stream.tolist() == expected and lengths.sum() == len(expected)


def test_models_with_a_dummy_prefix_are_never_cut(corpus, tmp_path):
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_sentences(docs)), model_prefix=str(tmp_path / "d"),
                                   vocab_size=100, minloglevel=2)  # SentencePiece's default: a dummy prefix
    proto = load_tokenizer(tmp_path / "d.model").serialized_model_proto()
    assert not can_cut_documents(proto)
    assert len(make_segments([long_text(20_000)], cut=False, segment_chars=1000)) == 1


def test_models_whose_pieces_may_span_spaces_are_never_cut(corpus, tmp_path):
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_sentences(docs)), model_prefix=str(tmp_path / "w"),
                                   vocab_size=200, add_dummy_prefix=False, split_by_whitespace=False, minloglevel=2)
    assert not can_cut_documents(load_tokenizer(tmp_path / "w.model").serialized_model_proto())


def test_tokenizer_actors_follow_the_config_and_the_cluster(ray_local, caplog):
    from data_prep.encoding import pool_size

    assert pool_size(None) == 2  # every CPU of the (2-CPU) Ray cluster
    assert pool_size(1) == 1
    assert pool_size(5) == 2 and "data.num_workers=5 but the Ray cluster has 2 CPUs" in caplog.text


def test_blocks_cover_every_piece_once_in_order(monkeypatch):
    monkeypatch.setattr(encoding_module, "_MIN_BLOCK_CHARS", 2000)
    docs = [long_text(n, seed=n) for n in (100, 30_000, 50, 9_000, 700)]
    segments = make_segments(docs, cut=True, segment_chars=2000)
    is_val = np.arange(len(segments)) % 3 == 0
    blocks = make_blocks(segments, is_val, workers=2)
    assert [b["block"] for b in blocks] == list(range(len(blocks))) and len(blocks) > 1
    assert [t for b in blocks for t in b["texts"]] == segments.texts
    assert [(b["first"], b["stop"]) for b in blocks] == list(zip([0] + [b["stop"] for b in blocks[:-1]],
                                                                  [b["stop"] for b in blocks], strict=True))
    resumed = make_blocks(segments, is_val, workers=1, start=7)
    assert resumed[0]["first"] == 7 and [t for b in resumed for t in b["texts"]] == segments.texts[7:]
    assert make_blocks(segments, is_val, workers=2, start=len(segments)) == []


def test_long_lines_still_train_the_tokenizer(tmp_path):
    text = long_text(200_000, seed=3).replace("\n", " ")  # one line of 200 KB: SentencePiece skips such lines
    sentences = list(training_sentences([text]))
    assert len(sentences) > 40 and all(len(s) <= 4096 for s in sentences)
    path = train_tokenizer([text], TokenizerConfig(vocab_size=300), tmp_path / "t.model", seed=0)
    sp = load_tokenizer(path)
    assert sp.decode(sp.encode(text[:5000])) == text[:5000]
