"""Weighted mixtures and the corpus fingerprint: exact, seeded sampling by weight; per-source statistics in
the manifest; realised proportions that follow the weights; a changed input file gives a new data set."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest

import data_prep.encoding as encoding_module
import data_prep.mixture as mixture_module
from data_prep.inspect import describe
from data_prep.mixture import copies_per_document, corpus_record, read_corpus
from data_prep.prepare import dataset_dir, prepare
from data_prep.shards import load_manifest
from data_prep.sources import SourceError, read_source
from data_prep.tokenizer import load_tokenizer
from pipeline.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig, validate_data


@pytest.mark.parametrize("weight,expected", [(1.0, 40), (2.0, 80), (0.5, 20), (2.25, 90), (0.01, 0)])
def test_copies_follow_the_weight_exactly(weight, expected):
    copies = copies_per_document(40, weight, seed=3, name="a")
    assert copies.sum() == expected
    assert set(copies.tolist()) <= {int(weight), int(weight) + 1}
    assert np.array_equal(copies, copies_per_document(40, weight, seed=3, name="a"))  # seeded


def test_the_kept_half_depends_on_seed_and_name():
    picks = {key: tuple(np.flatnonzero(copies_per_document(100, 0.5, *key))) for key in
             [(1, "a"), (1, "b"), (2, "a")]}
    assert len(set(picks.values())) == 3


def mixture_config(make_corpus, tmp_path, weights=(2.0, 0.5), **kw) -> DataConfig:
    a = make_corpus(tmp_path / "a", n_docs=30, seed=1)
    b = make_corpus(tmp_path / "b", n_docs=30, seed=2)
    sources = [SourceConfig(name="a", source="text", path=str(a), weight=weights[0]),
               SourceConfig(name="b", source="text", path=str(b), doc_split="blank_line", weight=weights[1])]
    base = dict(name="mix", source="mixture", mixture=sources, context_length=16, val_fraction=0.1,
                output_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(vocab_size=400), num_workers=2,
                shard_tokens=17 * 100)
    return DataConfig(**{**base, **kw})


def test_mixture_samples_by_weight_and_interleaves(corpus_maker, tmp_path):
    cfg = mixture_config(corpus_maker, tmp_path)
    corpus = read_corpus(cfg)
    docs_a, _ = read_source(cfg.mixture[0], "replace")
    docs_b, _ = read_source(cfg.mixture[1], "replace")
    n_a, n_b = int((corpus.source_of == 0).sum()), int((corpus.source_of == 1).sum())
    assert (n_a, n_b) == (2 * len(docs_a), round(0.5 * len(docs_b)))
    assert [s.documents for s in corpus.sources] == [n_a, n_b]
    assert [s.documents_read for s in corpus.sources] == [len(docs_a), len(docs_b)]
    # Every document of a (weight 2) twice; a seeded half of b's, once.
    assert all(corpus.documents.count(d) == 2 for d in docs_a)
    kept_b = [d for d, s in zip(corpus.documents, corpus.source_of, strict=True) if s == 1]
    assert len(set(kept_b)) == len(kept_b) and set(kept_b) <= set(docs_b)
    # Interleaved, not one source after the other; and the same order every time.
    quarter = corpus.source_of[: len(corpus.source_of) // 4]
    assert set(quarter.tolist()) == {0, 1}
    assert read_corpus(cfg).documents == corpus.documents
    assert read_corpus(dataclasses.replace(cfg, seed=99)).documents != corpus.documents


def test_mixture_errors_name_the_entry(corpus_maker, tmp_path):
    cfg = mixture_config(corpus_maker, tmp_path)
    validate_data(dataclasses.replace(cfg, output_dir=str(tmp_path)))
    bad = [
        (dataclasses.replace(cfg, mixture=[]), "data.mixture is empty"),
        (dataclasses.replace(cfg, source="text", path=str(tmp_path / "a")), "set data.source=mixture"),
        (dataclasses.replace(cfg, mixture=[cfg.mixture[0], dataclasses.replace(cfg.mixture[1], name="a")]),
         r"data.mixture.1.name='a' is taken by an earlier source"),
        (dataclasses.replace(cfg, mixture=[cfg.mixture[0], dataclasses.replace(cfg.mixture[1], weight=0.0)]),
         r"data.mixture.1.weight=0.0 must be a positive number"),
        (dataclasses.replace(cfg, mixture=[dataclasses.replace(cfg.mixture[0], path=str(tmp_path / "none"))]),
         r"data.mixture.0.path=.*none does not exist"),
        (dataclasses.replace(cfg, mixture=[dataclasses.replace(cfg.mixture[0], source="csv")]),
         r"data.mixture.0.source='csv' is not one of"),
    ]
    for config, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_data(config)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("   \n")
    empty = dataclasses.replace(cfg.mixture[1], path=str(tmp_path / "empty"))
    with pytest.raises(SourceError, match=r"data.mixture.1.source=text, data.mixture.1.path=.*no non-empty document"):
        read_corpus(dataclasses.replace(cfg, mixture=[cfg.mixture[0], empty]))


def test_prepared_mixture_reports_each_source_and_follows_the_weights(corpus_maker, tmp_path, ray_local, monkeypatch):
    monkeypatch.setattr(encoding_module, "_MIN_BLOCK_CHARS", 2000)
    cfg = mixture_config(corpus_maker, tmp_path)
    out = prepare(cfg)
    manifest = load_manifest(out)
    assert manifest.source["kind"] == "mixture" and manifest.source["files"] == 60
    a, b = manifest.source["sources"]
    assert (a["name"], a["weight"], b["name"], b["weight"]) == ("a", 2.0, "b", 0.5)
    # The tokens each source contributed are exactly its kept documents' tokens (each plus EOS).
    sp = load_tokenizer(manifest.tokenizer_path)
    corpus = read_corpus(cfg)
    for i, src in enumerate((a, b)):
        docs = [d for d, s in zip(corpus.documents, corpus.source_of, strict=True) if s == i]
        assert src["documents"] == len(docs)
        assert sum(src["tokens"].values()) == sum(len(ids) + 1 for ids in sp.encode(docs))
    assert sum(a["tokens"].values()) + sum(b["tokens"].values()) == sum(manifest.stats["tokens"].values())
    # Realised shares follow weight x source size: a, at weight 2, against half of b.
    alone = [sum(len(ids) + 1 for ids in sp.encode(read_source(s, "replace")[0])) for s in cfg.mixture]
    expected_a = 2.0 * alone[0] / (2.0 * alone[0] + 0.5 * alone[1])
    assert a["token_share"] == pytest.approx(expected_a, abs=0.03)
    assert a["token_share"] + b["token_share"] == pytest.approx(1.0)
    shown = describe(out)
    assert re.search(r"a \(text .*\), weight 2: \d+ of \d+ documents, \d+ tokens \([\d.]+% of the mix\)", shown)
    # Same bytes with one worker (the sampling happens before the actors).
    one = prepare(dataclasses.replace(cfg, num_workers=1, output_dir=str(tmp_path / "one")))
    assert one.name == out.name
    for path in sorted(out.iterdir()):
        assert (one / path.name).read_bytes() == path.read_bytes(), path.name


def test_changed_input_file_gives_a_new_data_set(corpus_maker, tmp_path, monkeypatch):
    corpus = corpus_maker(tmp_path / "c", n_docs=5)
    cfg = DataConfig(name="t", source="text", path=str(corpus), output_dir=str(tmp_path / "out"))
    first = dataset_dir(cfg)
    assert dataset_dir(cfg) == first
    doc = corpus / "doc_000.txt"
    stat = doc.stat()
    # Small corpora are fingerprinted by content: touching a file changes nothing, editing it does.
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dataset_dir(cfg) == first
    doc.write_text(doc.read_text() + " more")
    assert dataset_dir(cfg) != first
    (corpus / "doc_new.txt").write_text("a new file")
    second = dataset_dir(cfg)
    assert second != first
    # Large corpora by (path, size, mtime_ns): no file is read to fingerprint them.
    monkeypatch.setattr(mixture_module, "_HASH_CONTENT_BYTES", 0)
    large = dataset_dir(cfg)
    assert all(isinstance(f[2], int) for f in corpus_record(cfg)[0]["files"])
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert dataset_dir(cfg) != large
    # Names relative to the installed plays, so every installation of the same plays agrees.
    plays = corpus_record(DataConfig())[0]["files"]
    assert len(plays) == 38 and not any(name.startswith("/") for name, _, _ in plays)


def test_missing_corpus_does_not_break_looking_up_a_data_set(tmp_path):
    cfg = DataConfig(name="t", source="text", path=str(tmp_path / "gone"), output_dir=str(tmp_path))
    record = corpus_record(cfg)
    assert "does not exist" in record[0]["unreadable"] and record[0]["files"] == []
    assert dataset_dir(cfg).parent == tmp_path


def test_undecodable_bytes_are_summed_over_the_sources(corpus_maker, tmp_path):
    cfg = mixture_config(corpus_maker, tmp_path)
    for name in ("a", "b"):
        (tmp_path / name / "bad.txt").write_bytes(b"bad \xff byte")
    report = read_corpus(dataclasses.replace(cfg, on_decode_error="skip")).report
    assert (report.bad_bytes, report.bad_bytes_documents, report.skipped_documents, report.files) == (2, 2, 2, 62)
