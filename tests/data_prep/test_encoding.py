"""Encoding on the workers: long documents in pieces whose BPE tokens are the whole document's, a block's
stream (EOS only after a document's end), blocks that cover every document once and in order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sentencepiece as spm

import data_prep.encoding as encoding_module
from data_prep.encoding import can_cut_documents, cut_points, make_segments
from data_prep.partition_work import blocks_of, encode_block
from data_prep.text_tokenizer import SentencePieceTokenizer, Specials
from data_prep.tokenizer import load_tokenizer, train_tokenizer, training_sentences
from pipeline.config import TokenizerConfig


@pytest.fixture(scope="module")
def bpe_path(corpus, tmp_path_factory):
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    return train_tokenizer(docs, TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("tok") / "t.model", 1)


def long_text(chars: int, seed: int = 0) -> str:
    from corpora import WORDS

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


def test_a_block_is_its_documents_joined_by_eos_long_ones_encoded_in_pieces(bpe_path, monkeypatch, caplog):
    sp = load_tokenizer(bpe_path)
    monkeypatch.setattr(encoding_module, "_SEGMENT_CHARS", 5000)
    text = long_text(300_000, seed=1)
    docs = ["short one", text, "another"]
    tokenizer = SentencePieceTokenizer(bpe_path.read_bytes())
    with caplog.at_level("INFO", logger="data_prep.encoding"):
        stream, lengths = encode_block(tokenizer, docs, True, np.dtype("<u2"))
    assert "1 documents longer than 5000 characters are encoded in" in caplog.text
    # One EOS per document, after its last piece only.
    eos = sp.eos_id()
    expected = [sp.encode(d) + [eos] for d in docs]
    assert stream.dtype == np.dtype("<u2")
    assert stream.tolist() == [t for ids in expected for t in ids]
    assert lengths.tolist() == [len(ids) for ids in expected]
    # Not cut (as for a model with a dummy prefix): each document encoded whole, the same tokens here.
    whole, whole_lengths = encode_block(tokenizer, docs, False, np.dtype("<u2"))
    assert whole.tolist() == stream.tolist() and whole_lengths.tolist() == lengths.tolist()
    # A convention that starts each document with BOS: before its first piece only, counted in its length.
    bos_first = SentencePieceTokenizer(bpe_path.read_bytes(), Specials(sp.bos_id(), eos, prefix=(sp.bos_id(),)))
    stream, lengths = encode_block(bos_first, docs, True, np.dtype("<u2"))
    assert stream.tolist() == [t for ids in expected for t in [sp.bos_id(), *ids]]
    assert lengths.tolist() == [len(ids) + 1 for ids in expected]


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


def test_blocks_cover_every_document_once_in_order():
    docs = [long_text(n, seed=n) for n in (100, 30_000, 50, 9_000, 700, 1200, 10)]
    blocks = list(blocks_of(iter(docs), 2000))
    assert [d for b in blocks for d in b] == docs and all(blocks)
    # A block closes once it holds block_chars of text: a long document alone, short ones gathered.
    assert [len(b) for b in blocks] == [2, 2, 3]
    assert all(sum(map(len, b[:-1])) < 2000 for b in blocks)
    assert list(blocks_of(iter(docs), 1 << 30)) == [docs]
    assert list(blocks_of(iter([]), 2000)) == []


def test_long_lines_still_train_the_tokenizer(tmp_path):
    text = long_text(200_000, seed=3).replace("\n", " ")  # one line of 200 KB: SentencePiece skips such lines
    sentences = list(training_sentences([text]))
    assert len(sentences) > 40 and all(len(s) <= 4096 for s in sentences)
    path = train_tokenizer([text], TokenizerConfig(vocab_size=300), tmp_path / "t.model", seed=0)
    sp = load_tokenizer(path)
    assert sp.decode(sp.encode(text[:5000])) == text[:5000]
