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


def sample_of(cfg: DataConfig, k: int, order=lambda parts: parts, chars: int = 1 << 40) -> list[str]:
    """The tokenizer sample as prepare draws it: each partition's bottom k (of its first `chars` characters, at or
    below the merged sample's limit so far), merged on arrival, here in the given order of the partitions."""
    from data_prep.partition_work import ReadContext
    from data_prep.tokenizer_sample import BottomK, sample_sentences

    ctx, bottom = ReadContext.of(cfg), BottomK(k)
    for part in order(partition_inputs(cfg)):
        bottom.add(sample_sentences(part, ctx, k, chars, bottom.limit))
    return bottom.result().sentences.tolist()


def test_the_tokenizer_sample_is_seeded_training_text_whatever_order_the_partitions_arrive_in(corpus, tmp_path):
    import random

    from data_prep.mixture import read_documents
    from data_prep.partition_work import is_validation

    cfg = DataConfig(source="text", path=str(corpus), val_fraction=0.2, seed=5, partition_bytes=3000)
    assert len(partition_inputs(cfg)) > 4
    sample = sample_of(cfg, 150)
    assert len(sample) == 150
    assert sample_of(cfg, 150, lambda parts: parts[::-1]) == sample
    assert sample_of(cfg, 150, lambda parts: random.Random(3).sample(parts, len(parts))) == sample
    docs, _ = read_documents(cfg)
    train_lines = set(training_sentences([d for d in docs if not is_validation(d, cfg.val_fraction)]))
    val_only = set(training_sentences([d for d in docs if is_validation(d, cfg.val_fraction)])) - train_lines
    assert set(sample) <= train_lines and val_only
    assert sample_of(dataclasses.replace(cfg, seed=6), 150) != sample
    # Trained on exactly that sample, in that order: the same model every time.
    tok = TokenizerConfig(vocab_size=340)
    a = train_tokenizer_on_sample(iter(sample), tok, tmp_path / "a.model", seed=5)
    b = train_tokenizer_on_sample(list(sample), tok, tmp_path / "b.model", seed=5)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(TokenizerError, match="no text to train the tokenizer on"):
        train_tokenizer_on_sample([], tok, tmp_path / "c.model", seed=5)


def test_the_sample_is_of_occurrences_uniform_over_the_corpus(tmp_path):
    # One line repeated 3000 times among 3000 lines that occur once, spread over several partitions: a uniform
    # sample of 1200 of the 6000 occurrences holds the repeated line about 600 times (hypergeometric, sd 15.5),
    # where a sample keyed by the text held it 0 or 1200 times. Seeded, so the figures are fixed; the bounds
    # are 5 sd, the distribution's, not a tolerance for chance.
    repeated = "Subscribe to our newsletter."
    lines = [repeated if i % 2 else f"line {i} of the corpus" for i in range(6000)]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "c.txt"), doc_split="line", val_fraction=0.0,
                     partition_bytes=16 << 10)
    assert len(partition_inputs(cfg)) >= 4
    counts = [sample_of(dataclasses.replace(cfg, seed=seed), 1200).count(repeated) for seed in range(3)]
    assert all(522 < c < 678 for c in counts), counts
    # Positions too: the sampled unique lines spread evenly over the corpus (each half about 300, sd 11).
    sample = sample_of(cfg, 1200)
    first_half = sum(1 for s in sample if s != repeated and int(s.split()[1]) < 3000)
    second_half = sum(1 for s in sample if s != repeated and int(s.split()[1]) >= 3000)
    assert abs(first_half - second_half) < 110, (first_half, second_half)


def test_a_partition_is_sampled_from_its_first_characters_only(tmp_path):
    lines = [f"early line {i}" for i in range(500)] + [f"late line {i}" for i in range(500)]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="text", path=str(tmp_path / "c.txt"), doc_split="line", val_fraction=0.0)
    assert len(partition_inputs(cfg)) == 1
    sample = sample_of(cfg, 100, chars=len("".join(lines[:400])))
    assert len(sample) == 100 and all(s.startswith("early") for s in sample)
    assert any(s.startswith("late") for s in sample_of(cfg, 1000))


def test_the_running_bottom_k_is_the_bottom_k_of_everything_whatever_it_drops_on_the_way():
    import numpy as np

    from data_prep.tokenizer_sample import BottomK, SentenceSample, object_array

    rng = np.random.default_rng(0)
    parts = []
    for p in range(12):
        n = int(rng.integers(0, 400))
        keys = rng.integers(0, 50, n).astype(np.uint64)  # many ties: broken by partition, then position
        parts.append(SentenceSample(object_array([f"{p}:{i}" for i in range(n)]), keys, np.full(n, p), np.arange(n)))
    expected = SentenceSample.concat(parts).bottom(100).sentences.tolist()
    for order in (parts, parts[::-1], [parts[i] for i in rng.permutation(len(parts))]):
        bottom = BottomK(100)
        for part in order:
            bottom.add(part)
            assert bottom.count < 2 * 100 + 400
        assert bottom.result().sentences.tolist() == expected
