"""SentencePiece training: exact round trips (line breaks, indentation), fixed ids, determinism, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from data_prep.partitions import partition_inputs
from data_prep.tokenizer import (
    TokenizerError,
    copy_tokenizer,
    load_tokenizer,
    round_trip_failures,
    train_tokenizer,
    train_tokenizer_on_sample,
    training_sentences,
)
from pipeline.config import ConfigError, DataConfig, TokenizerConfig, validate_data


@pytest.fixture(scope="module")
def documents(corpus):
    return [p.read_text() for p in sorted(corpus.iterdir())]


@pytest.fixture(scope="module")
def tokenizer_path(documents, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(documents, TokenizerConfig(vocab_size=400), path, seed=1)


def test_decode_encode_round_trips_line_breaks_indentation_and_unseen_characters(tokenizer_path, documents):
    sp = load_tokenizer(tokenizer_path)
    texts = [
        "the king\nand the queen\n\n\nof love",
        "    indented line\n\tand a tab\n",
        "  leading spaces, trailing spaces   ",
        "unseen: é ü 漢字 🙂",  # through byte fallback
        *documents[:10],
    ]
    assert round_trip_failures(sp, texts) == []
    assert sp.piece_to_id("\n") > 3 and sp.encode("a\nb").count(sp.piece_to_id("\n")) == 1


def test_special_ids_are_fixed(tokenizer_path):
    sp = load_tokenizer(tokenizer_path)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 400


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_training_is_deterministic(documents, tmp_path, kind):
    # sample_sentences below the corpus's line count: the sampling itself must be seeded.
    tok = TokenizerConfig(type=kind, vocab_size=350, sample_sentences=300)
    a = train_tokenizer(documents, tok, tmp_path / "a.model", seed=7).read_bytes()
    b = train_tokenizer(documents, tok, tmp_path / "b.model", seed=7).read_bytes()
    assert a == b


def test_too_large_vocabulary_is_rephrased(documents, tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=50000 is too large.*lower data.tokenizer.vocab_size to \d+"):
        train_tokenizer(documents[:3], TokenizerConfig(vocab_size=50_000), tmp_path / "t.model", seed=0)
    assert not (tmp_path / "t.model").exists()


def test_too_small_vocabulary_is_caught_by_validation():
    with pytest.raises(ConfigError, match="vocab_size=200 leaves no room.*261"):
        validate_data(DataConfig(output_dir="out", tokenizer=TokenizerConfig(vocab_size=200)))
    validate_data(DataConfig(output_dir="out", tokenizer=TokenizerConfig(vocab_size=200, byte_fallback=False)))


def test_corpus_characters_beyond_a_small_vocabulary_are_explained(tmp_path):
    text = ["".join(chr(0x4E00 + i) for i in range(j, j + 40)) for j in range(0, 400, 40)]
    tok = TokenizerConfig(vocab_size=100, byte_fallback=False)
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small.*at least"):
        train_tokenizer(text, tok, tmp_path / "t.model", seed=0)


def test_loading_refuses_non_models_and_models_without_eos(tmp_path, documents):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing.model")

    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_sentences(documents)),
                                   model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=100, eos_id=-1, minloglevel=2)
    with pytest.raises(TokenizerError, match="has no EOS piece"):
        copy_tokenizer(tmp_path / "noeos.model", tmp_path / "copy.model")


def test_a_line_is_encoded_the_same_at_a_document_start_and_after_a_line_break(tokenizer_path):
    # No dummy prefix: the first word of a document and of every line share their pieces (as in training).
    sp = load_tokenizer(tokenizer_path)
    line = "The king and the queen"
    after_break = sp.encode("Of love\n" + line)
    assert after_break[-len(sp.encode(line)):] == sp.encode(line)
    assert after_break[-len(sp.encode(line)) - 1] == sp.piece_to_id("\n")


def sample_of(cfg: DataConfig, k: int) -> list[tuple[int, str]]:
    """The tokenizer sample as prepare draws it: each partition's bottom k, then the bottom k of them all."""
    import heapq

    from data_prep.partition_work import ReadContext, sample_sentences

    ctx = ReadContext.of(cfg)
    return heapq.nsmallest(k, (x for part in partition_inputs(cfg) for x in sample_sentences(part, ctx, k)))


def test_the_tokenizer_sample_is_seeded_training_text_whatever_the_partitioning(corpus, tmp_path):
    from data_prep.mixture import read_documents
    from data_prep.partition_work import is_validation

    cfg = DataConfig(source="text", path=str(corpus), val_fraction=0.2, seed=5)
    sample = sample_of(cfg, 150)
    assert len(sample) == 150
    cut = dataclasses.replace(cfg, partition_bytes=3000)
    assert len(partition_inputs(cut)) > 4 and sample_of(cut, 150) == sample
    docs, _ = read_documents(cfg)
    train_lines = set(training_sentences([d for d in docs if not is_validation(d, cfg.val_fraction)]))
    val_only = set(training_sentences([d for d in docs if is_validation(d, cfg.val_fraction)])) - train_lines
    assert {s for _, s in sample} <= train_lines and val_only
    assert sample_of(dataclasses.replace(cfg, seed=6), 150) != sample
    # Trained on exactly that sample, in that order: the same model every time.
    tok = TokenizerConfig(vocab_size=340)
    a = train_tokenizer_on_sample((s for _, s in sample), tok, tmp_path / "a.model", seed=5)
    b = train_tokenizer_on_sample([s for _, s in sample], tok, tmp_path / "b.model", seed=5)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(TokenizerError, match="no text to train the tokenizer on"):
        train_tokenizer_on_sample([], tok, tmp_path / "c.model", seed=5)
