"""Mixtures and the corpus fingerprint: a mixture is a blend of data sets prepared once each with one tokenizer
(the same bytes as each source prepared alone); a new weight tokenizes nothing; a changed input file gives a
new data set."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import pytest

import data_prep.mixture as mixture_module
from data_prep.blend import component_dirs, is_blend, load_blend
from data_prep.errors import SourceError
from data_prep.inspect import describe
from data_prep.mixture import corpus_record, read_documents, read_source
from data_prep.prepare import DataPrepError, dataset_dir, is_complete, prepare
from data_prep.shards import load_manifest, sha256_file
from pipeline.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig, validate_data

TEXTS = [f"document number {i}" for i in range(4000)]


def mixture_config(make_corpus, tmp_path, weights=(2.0, 0.5), **kw) -> DataConfig:
    a = make_corpus(tmp_path / "a", n_docs=30, seed=1)
    b = make_corpus(tmp_path / "b", n_docs=30, seed=2)
    sources = [SourceConfig(name="a", source="text", path=str(a), weight=weights[0]),
               SourceConfig(name="b", source="text", path=str(b), doc_split="blank_line", weight=weights[1])]
    base = dict(name="mix", source="mixture", mixture=sources, context_length=16, val_fraction=0.1,
                output_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(vocab_size=400), num_workers=2,
                shard_tokens=17 * 100)
    return DataConfig(**{**base, **kw})


def test_mixture_reads_its_sources_in_plan_order(corpus_maker, tmp_path):
    """What the shared tokenizer's sample is drawn from: every source's documents once, whatever its weight."""
    cfg = mixture_config(corpus_maker, tmp_path)
    docs, report = read_documents(cfg)
    docs_a, _ = read_source(cfg.mixture[0], cfg, "data.mixture.0")
    docs_b, _ = read_source(cfg.mixture[1], cfg, "data.mixture.1")
    assert docs == docs_a + docs_b and report.files == 60
    assert read_documents(dataclasses.replace(cfg, mixture=[dataclasses.replace(s, weight=9.0) for s in cfg.mixture]))[0] == docs


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


def test_a_mixture_is_a_blend_of_data_sets_prepared_once_with_one_tokenizer(corpus_maker, tmp_path, ray_local,
                                                                            monkeypatch):
    cfg = mixture_config(corpus_maker, tmp_path, partition_bytes=4000)  # several partitions per source
    out = prepare(cfg)
    assert is_blend(out) and is_complete(out) and dataset_dir(cfg) == out
    blend = load_blend(out)
    assert [(c.name, c.weight, c.share) for c in blend.components] == [("a", 2.0, 0.8), ("b", 0.5, 0.2)]
    manifests = blend.manifests()
    # One tokenizer, trained once for the mixture, shared by both data sets (and copied beside the recipe).
    assert {m.tokenizer_sha256 for m in manifests} == {blend.tokenizer_sha256}
    assert sha256_file(blend.tokenizer_path) == blend.tokenizer_sha256
    for component, manifest in zip(blend.components, manifests, strict=True):
        assert component.windows["train"] == sum(s.n_windows for s in manifest.splits["train"]) > 0
        assert manifest.source["files"] == 30 and manifest.stats["partitions"] > 1
    shown = describe(out)
    assert re.search(r"a: weight 2 \(share 80.0%\), \d+ train / \d+ validation windows", shown)

    # Source by source: each source prepared alone with that tokenizer (copied elsewhere) and one worker
    # writes the same shards, byte for byte.
    tokenizer = tmp_path / "elsewhere" / "shared.model"
    tokenizer.parent.mkdir()
    shutil.copy(blend.tokenizer_path, tokenizer)
    for i, (component, manifest) in enumerate(zip(blend.components, manifests, strict=True)):
        src = cfg.mixture[i]
        alone = prepare(dataclasses.replace(
            cfg, name=f"alone{i}", source=src.source, path=src.path, doc_split=src.doc_split, mixture=[],
            num_workers=1, output_dir=str(tmp_path / "alone"),
            tokenizer=dataclasses.replace(cfg.tokenizer, model_path=str(tokenizer))))
        solo = load_manifest(alone)
        assert solo.splits == manifest.splits  # names, sizes and sha256 of every shard
        for shards in manifest.splits.values():
            for info in shards:
                assert (alone / info.file).read_bytes() == (blend.component_dir(component) / info.file).read_bytes()

    # A new weight is a new recipe over the same data sets: nothing is tokenized, no shard is touched.
    before = {p: p.stat().st_mtime_ns for d in component_dirs(out) for p in d.iterdir()}
    import data_prep.build as build_module
    import data_prep.prepare_mixture as prepare_mixture_module

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a new weight must not tokenize anything")

    monkeypatch.setattr(build_module, "_build", no_tokenizing)
    monkeypatch.setattr(prepare_mixture_module, "_prepare_tokenizer", no_tokenizing)
    reweighted = dataclasses.replace(cfg, mixture=[cfg.mixture[0], dataclasses.replace(cfg.mixture[1], weight=1.5)])
    out2 = prepare(reweighted)
    assert out2 != out and component_dirs(out2) == component_dirs(out)
    assert [c.share for c in load_blend(out2).components] == [pytest.approx(2 / 3.5), pytest.approx(1.5 / 3.5)]
    assert {p: p.stat().st_mtime_ns for d in component_dirs(out) for p in d.iterdir()} == before
    # A blend can also name a data set prepared before: its tokenizer becomes the mixture's.
    prepared_a = blend.component_dir(blend.components[0])
    mixed = dataclasses.replace(cfg, mixture=[dataclasses.replace(cfg.mixture[0], dataset=str(prepared_a), path=None),
                                              cfg.mixture[1]])
    out3 = prepare(mixed)
    assert component_dirs(out3) == component_dirs(out) and load_blend(out3).tokenizer_sha256 == blend.tokenizer_sha256


def test_a_blend_refuses_data_sets_with_another_tokenizer(corpus_maker, tmp_path, ray_local):
    cfg = mixture_config(corpus_maker, tmp_path)
    single = lambda name, i, vocab: dataclasses.replace(  # noqa: E731
        cfg, name=name, source="text", path=cfg.mixture[i].path, mixture=[],
        tokenizer=TokenizerConfig(vocab_size=vocab))
    a, b = prepare(single("a", 0, 400)), prepare(single("b", 1, 350))
    mixed = dataclasses.replace(cfg, mixture=[SourceConfig(name="a", dataset=str(a)),
                                              SourceConfig(name="b", dataset=str(b))])
    with pytest.raises(DataPrepError, match=r"data set 'b' .* has tokenizer_sha256 .*data.tokenizer.model_path="):
        prepare(mixed)
    with pytest.raises(ConfigError, match=r"data.mixture.1.dataset=.* is not a prepared data set"):
        validate_data(dataclasses.replace(mixed, mixture=[mixed.mixture[0], SourceConfig(name="b", dataset=str(tmp_path))]))


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
