"""Weighted mixtures and the corpus fingerprint: a seeded per-document rate by weight; per-source statistics in
the manifest; realised proportions that follow the weights; a changed input file gives a new data set."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

import data_prep.mixture as mixture_module
from data_prep.inspect import describe
from data_prep.mixture import corpus_record, read_documents, read_source
from data_prep.partition_work import copies_of, is_validation
from data_prep.partitions import plan_partitions
from data_prep.prepare import dataset_dir, prepare
from data_prep.shards import load_manifest
from data_prep.sources import DecodeReport, SourceError, piece_documents
from data_prep.tokenizer import load_tokenizer
from pipeline.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig, validate_data

TEXTS = [f"document number {i}" for i in range(4000)]


@pytest.mark.parametrize("weight", [1.0, 2.0, 0.5, 2.25, 0.01])
def test_copies_follow_the_weight_as_a_rate(weight):
    copies = [copies_of(t, weight, seed=3, name="a") for t in TEXTS]
    assert set(copies) <= {int(weight), int(weight) + 1}
    assert sum(copies) / len(TEXTS) == pytest.approx(weight, abs=0.03)
    assert [copies_of(t, weight, seed=3, name="a") for t in reversed(TEXTS)] == copies[::-1]  # by text, not place
    if weight == int(weight):
        assert set(copies) == {int(weight)}  # a whole weight is exact


def test_the_kept_half_depends_on_seed_and_name():
    picks = {key: tuple(t for t in TEXTS[:200] if copies_of(t, 0.5, *key)) for key in [(1, "a"), (1, "b"), (2, "a")]}
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


def test_mixture_reads_each_source_by_its_weight_in_plan_order(corpus_maker, tmp_path):
    cfg = mixture_config(corpus_maker, tmp_path)
    docs, report = read_documents(cfg)
    docs_a, _ = read_source(cfg.mixture[0], cfg, "data.mixture.0")
    docs_b, _ = read_source(cfg.mixture[1], cfg, "data.mixture.1")
    kept_b = [d for d in docs_b if copies_of(d, 0.5, cfg.seed, "b")]
    assert len(kept_b) == pytest.approx(0.5 * len(docs_b), abs=0.15 * len(docs_b))
    # One partition per source here: a's documents, then their second copies (a later pass, so that a
    # document and its copy are never side by side), then the seeded half of b's.
    assert docs == docs_a + docs_a + kept_b and report.files == 60
    assert read_documents(cfg)[0] == docs
    other_seed = read_documents(dataclasses.replace(cfg, seed=99))[0]
    assert other_seed[: 2 * len(docs_a)] == docs_a + docs_a and other_seed != docs
    # Several partitions per source: within each partition, its documents and then their copies.
    cut = dataclasses.replace(cfg, partition_bytes=3000)
    plan = plan_partitions(cut)
    assert len(plan) > 4
    expected = []
    for part in plan:
        src = cut.mixture[part.source]
        read = [d for piece in part.pieces for d in piece_documents(src, piece, cut, DecodeReport(), "data")]
        expected += read + read if src.name == "a" else [d for d in read if copies_of(d, 0.5, cut.seed, "b")]
    cut_docs = read_documents(cut)[0]
    assert cut_docs == expected and cut_docs != docs and sorted(cut_docs) == sorted(docs)


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
        read_source(empty, cfg, "data.mixture.1")


def test_prepared_mixture_reports_each_source_and_follows_the_weights(corpus_maker, tmp_path, ray_local):
    cfg = mixture_config(corpus_maker, tmp_path, partition_bytes=4000)  # several partitions per source
    out = prepare(cfg)
    manifest = load_manifest(out)
    assert manifest.source["kind"] == "mixture" and manifest.source["files"] == 60
    assert manifest.stats["partitions"] > 4
    a, b = manifest.source["sources"]
    assert (a["name"], a["weight"], b["name"], b["weight"]) == ("a", 2.0, "b", 0.5)
    assert (a["files"], b["files"]) == (30, 30)
    # The tokens each source contributed are exactly its kept documents' tokens (each plus EOS).
    sp = load_tokenizer(manifest.tokenizer_path)
    docs_a, _ = read_source(cfg.mixture[0], cfg, "data.mixture.0")
    docs_b, _ = read_source(cfg.mixture[1], cfg, "data.mixture.1")
    kept = {"a": docs_a + docs_a, "b": [d for d in docs_b if copies_of(d, 0.5, cfg.seed, "b")]}
    for src, read in ((a, docs_a), (b, docs_b)):
        assert (src["documents"], src["documents_read"]) == (len(kept[src["name"]]), len(read))
        assert sum(src["tokens"].values()) == sum(len(ids) + 1 for ids in sp.encode(kept[src["name"]]))
    assert sum(a["tokens"].values()) + sum(b["tokens"].values()) == sum(manifest.stats["tokens"].values())
    # A copy goes to its document's split (both copies of a document are in the same one).
    for split, is_val in (("train", False), ("validation", True)):
        mine = [d for d in docs_a if is_validation(d, cfg.val_fraction) == is_val]
        assert a["tokens"][split] == 2 * sum(len(ids) + 1 for ids in sp.encode(mine)) > 0
    # Realised shares follow weight x source size: a, at weight 2, against half of b.
    alone = [sum(len(ids) + 1 for ids in sp.encode(docs)) for docs in (docs_a, docs_b)]
    expected_a = 2.0 * alone[0] / (2.0 * alone[0] + 0.5 * alone[1])
    assert a["token_share"] == pytest.approx(expected_a, abs=0.03)
    assert a["token_share"] + b["token_share"] == pytest.approx(1.0)
    shown = describe(out)
    assert re.search(r"a \(text .*\), weight 2: \d+ of \d+ documents, \d+ tokens \([\d.]+% of the mix\)", shown)
    # Same bytes with one worker (the copies are drawn by hash, wherever a partition runs).
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


def test_hub_data_sets_are_fingerprinted_by_name_config_revision_and_split(tmp_path):
    cfg = DataConfig(name="t", source="hf_hub", path="someone/corpus", output_dir=str(tmp_path))
    assert corpus_record(cfg)[0]["files"] == []  # nothing to list (nor any network access)
    dirs = {dataset_dir(cfg)} | {dataset_dir(dataclasses.replace(cfg, **kw)) for kw in
                                 ({"hf_config": "en"}, {"hf_revision": "0123abc"}, {"hf_split": "validation"})}
    assert len(dirs) == 4


def test_missing_corpus_does_not_break_looking_up_a_data_set(tmp_path):
    cfg = DataConfig(name="t", source="text", path=str(tmp_path / "gone"), output_dir=str(tmp_path))
    record = corpus_record(cfg)
    assert "does not exist" in record[0]["unreadable"] and record[0]["files"] == []
    assert dataset_dir(cfg).parent == tmp_path


def test_undecodable_bytes_are_summed_over_the_sources(corpus_maker, tmp_path):
    cfg = mixture_config(corpus_maker, tmp_path)
    for name in ("a", "b"):
        (tmp_path / name / "bad.txt").write_bytes(b"bad \xff byte")
    _, report = read_documents(dataclasses.replace(cfg, on_decode_error="skip"))
    assert (report.bad_bytes, report.bad_bytes_documents, report.skipped_documents, report.files) == (2, 2, 2, 62)
