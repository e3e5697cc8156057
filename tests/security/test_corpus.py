"""Hostile corpora, built on disk and prepared for real: nothing read from a corpus may bring in files from outside
its root (symbolic links), loop (link loops), slip binary data into the tokens (NUL bytes past the first 8 KiB),
hide where undecodable bytes are, or fail without naming the file and line (deeply nested JSON)."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from corpora import make_corpus

from data_prep.decode_report import REPORTED_FILES
from data_prep.errors import SourceError
from data_prep.listing import expand_paths, source_configs
from data_prep.mixture import corpus_record, read_documents
from data_prep.partitions import partition_inputs
from data_prep.prepare import prepare
from data_prep.shards import SPLITS, WindowDataset, load_manifest
from data_prep.tokenizer import load_tokenizer
from pipeline.config import DataConfig, TokenizerConfig

SECRET = "aws_secret_access_key = QX7VZK2PL9RT4WMN"
N_DOCS = 30


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray for this module's prepare runs (as tests/data_prep/conftest.py starts it)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def config(path, out, **kw) -> DataConfig:
    """A small prepare: one worker, windows of 17 tokens, a 400-piece tokenizer."""
    base = dict(name="hostile", source="text", path=str(path), context_length=16, val_fraction=0.1,
                output_dir=str(out), tokenizer=TokenizerConfig(vocab_size=400), num_workers=1, shard_tokens=17 * 100)
    return DataConfig(**{**base, **kw})


def corpus_beside_credentials(tmp_path: Path) -> tuple[Path, Path]:
    """A corpus directory of N_DOCS files and, beside it, a credentials file (what a careless tarball links to)."""
    corpus = make_corpus(tmp_path / "corpus", n_docs=N_DOCS)
    credentials = tmp_path / "credentials"
    credentials.write_text("\n".join([SECRET] * 40))
    return corpus, credentials


def shard_text(out: Path) -> str:
    """Every kept window of both splits, decoded with the data set's tokenizer."""
    sp = load_tokenizer(load_manifest(out).tokenizer_path)
    return "".join(sp.decode(np.asarray(array).reshape(-1).tolist()) for split in SPLITS
                   for array in WindowDataset(out, split).arrays)


def planned_files(cfg: DataConfig) -> list[str]:
    return [piece.path for part in partition_inputs(cfg) for piece in part.pieces]


def test_a_link_to_credentials_beside_the_corpus_is_skipped_counted_and_never_tokenized(tmp_path, ray_local, caplog):
    corpus, credentials = corpus_beside_credentials(tmp_path)
    (corpus / "notes.txt").symlink_to("../credentials")  # relative, as a tarball carries it
    (corpus / "sub").mkdir()
    (corpus / "sub" / "keys.txt").symlink_to(credentials)  # absolute
    (corpus / "elsewhere").symlink_to(tmp_path, target_is_directory=True)  # a directory link out of the root
    with caplog.at_level(logging.WARNING):
        out = prepare(config(corpus, tmp_path / "out"))
    stats = load_manifest(out).stats
    links = [str(corpus / "elsewhere"), str(corpus / "notes.txt"), str(corpus / "sub" / "keys.txt")]
    assert stats["outside_links_skipped"] == links
    assert sum(stats["documents"].values()) == N_DOCS  # the 30 documents of the corpus, not a 31st
    text = shard_text(out)
    assert "king" in text and "QX7VZK2PL9RT4WMN" not in text and "secret" not in text
    for link in links:
        assert f"skipping {link}: a symbolic link to " in caplog.text
    assert f"a symbolic link to {credentials}, outside the corpus root" in caplog.text
    # The fingerprint lists the files prepare read: the corpus's own.
    assert [name for name, *_ in corpus_record(config(corpus, tmp_path))[0]["files"]] == planned_files(
        config(corpus, tmp_path)) == [str(p) for p in sorted(corpus.glob("doc_*.txt"))]
    # A file the user names directly is trusted as named, link or not.
    assert read_documents(config(corpus / "notes.txt", tmp_path))[0][0].startswith(SECRET)


def test_with_on_outside_link_error_prepare_stops_before_any_work_naming_the_link(tmp_path, ray_local):
    corpus, credentials = corpus_beside_credentials(tmp_path)
    (corpus / "notes.txt").symlink_to(credentials)
    cfg = config(f"{corpus}/**/*.txt", tmp_path / "out", on_outside_link="error")
    expected = (rf"{re.escape(str(corpus / 'notes.txt'))} .* is a symbolic link to {re.escape(str(credentials))}, "
                r"outside the corpus root .*data\.on_outside_link=skip")
    with pytest.raises(SourceError, match=expected):
        partition_inputs(cfg)  # planning itself refuses it
    with pytest.raises(SourceError, match=expected):
        prepare(cfg)
    assert list((tmp_path / "out").iterdir()) == []  # no tokenizer, no shard, no partial directory
    with pytest.raises(ValueError, match=r"data\.on_outside_link='follow' is not one of skip, error"):
        prepare(config(corpus, tmp_path / "out", on_outside_link="follow"))


def test_a_link_loop_under_a_recursive_glob_reads_each_file_once_and_finishes(tmp_path, ray_local):
    corpus = make_corpus(tmp_path / "corpus", n_docs=N_DOCS)
    (corpus / "sub").mkdir()
    (corpus / "doc_000.txt").rename(corpus / "sub" / "doc_000.txt")
    (corpus / "sub" / "loop").symlink_to(corpus, target_is_directory=True)  # corpus/sub/loop -> corpus
    (corpus / "self").symlink_to(".", target_is_directory=True)
    pattern = f"{corpus}/**/*.txt"
    t0 = time.time()
    files = expand_paths(pattern)
    assert time.time() - t0 < 5
    assert len(files) == len(set(files)) == N_DOCS and corpus / "sub" / "doc_000.txt" in files
    out = prepare(config(pattern, tmp_path / "out"))
    manifest = load_manifest(out)
    assert sum(manifest.stats["documents"].values()) == N_DOCS and manifest.source["files"] == N_DOCS
    assert manifest.stats["outside_links_skipped"] == []  # the loop stays inside the root: nothing to report


def test_a_link_to_a_file_inside_the_corpus_reads_that_file_once(tmp_path, ray_local):
    corpus = make_corpus(tmp_path / "corpus", n_docs=N_DOCS)
    (corpus / "deep").mkdir()
    (corpus / "doc_001.txt").rename(corpus / "deep" / "doc_001.txt")
    (corpus / "alias.txt").symlink_to("doc_000.txt")
    (corpus / "deep" / "up.txt").symlink_to("../doc_002.txt")
    (corpus / "shortcut.txt").symlink_to(corpus / "deep" / "doc_001.txt")
    linked_root = tmp_path / "linked"  # the user may name the corpus through a link of their own
    linked_root.symlink_to(corpus, target_is_directory=True)
    files = expand_paths(str(linked_root))
    assert len(files) == N_DOCS and linked_root / "doc_000.txt" in files and linked_root / "deep" / "doc_001.txt" in files
    assert not {"alias.txt", "up.txt", "shortcut.txt"} & {f.name for f in files}
    docs, report = read_documents(config(linked_root, tmp_path))
    assert len(docs) == len(set(docs)) == N_DOCS and report.outside_links == {}
    out = prepare(config(linked_root, tmp_path / "out"))
    assert sum(load_manifest(out).stats["documents"].values()) == N_DOCS


def test_links_are_never_walked_in_the_plays_either(tmp_path):
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet.md").write_text("# HAMLET\n\n## SCENE I. Elsinore.\n\nWho's there?\n")
    (tmp_path / "notes.md").write_text(f"## SCENE I\n\n{SECRET}\n")
    (plays / "notes.md").symlink_to(tmp_path / "notes.md")
    (plays / "again").symlink_to(plays, target_is_directory=True)
    docs, report = read_documents(DataConfig(source="shakespeare", path=str(plays)))
    assert len(docs) == 1 and "Who's there?" in docs[0] and report.outside_links == {
        str(plays / "notes.md"): str(tmp_path / "notes.md")}
    with pytest.raises(SourceError, match=r"notes\.md .* is a symbolic link to .*notes\.md, outside the corpus root"):
        read_documents(DataConfig(source="shakespeare", path=str(plays), on_outside_link="error"))


def test_the_walk_keeps_globs_rules_for_hidden_names(tmp_path):
    """Where no link is involved, the walk lists what glob.glob(recursive=True) lists (without its repeats)."""
    for name in ["a.txt", ".hidden.txt", "d/b.txt", "d/.h/c.txt", ".git/e.txt", "d/e/f.md", "x[1].txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    for pattern in ["**/*.txt", "*.txt", "**", "*/*", "**/.h/*", ".*/*", "d/**/*", "**/**/*.md", "?.txt", "[ab].*"]:
        wanted = sorted({Path(p) for p in glob.glob(str(tmp_path / pattern), recursive=True) if Path(p).is_file()})
        assert expand_paths(str(tmp_path / pattern)) == wanted, pattern
    assert expand_paths(str(tmp_path)) == [tmp_path / n for n in ["a.txt", "d/b.txt", "d/e/f.md", "x[1].txt"]]


def text_with_nul_past_the_probe(path: Path) -> int:
    """A text file of clean lines (blank at lines 101 and 201) whose line 300, past the first 8 KiB, holds 63 NUL
    bytes; returns their offset."""
    lines = ["" if i in (100, 200) else f"line {i} of the king and the queen of love" for i in range(400)]
    head = "".join(f"{line}\n" for line in lines[:299]).encode()
    assert len(head) > 8192
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + b"the night\x00" + b"\x00" * 62 + b"day\n" + "".join(f"{x}\n" for x in lines[300:]).encode())
    return len(head) + len(b"the night")


def test_nul_bytes_past_the_first_8_kib_skip_their_document_and_are_counted(tmp_path, ray_local, caplog):
    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    damaged = corpus / "damaged.txt"
    text_with_nul_past_the_probe(damaged)
    cfg = config(corpus, tmp_path / "out", doc_split="line")
    docs, report = read_documents(cfg)
    assert not any("\0" in d for d in docs) and len(docs) == len(set(docs)) > 397
    assert {"line 298 of the king and the queen of love", "line 300 of the king and the queen of love"} <= set(docs)
    assert (report.nul_documents, report.nul_documents_by_file) == (1, {str(damaged): 1})
    with caplog.at_level(logging.WARNING):
        out = prepare(cfg)
    stats = load_manifest(out).stats
    assert (stats["nul_documents_skipped"], stats["nul_documents_by_file"]) == (1, {str(damaged): 1})
    assert stats["binary_files_skipped"] == []  # the 8 KiB probe saw text
    assert f"{damaged}: 1 documents" in caplog.text and "skipped 1 documents holding NUL bytes" in caplog.text
    # One document per file, per paragraph, per JSON line: the document holding them goes, the rest stays.
    docs, report = read_documents(config(corpus, tmp_path, doc_split="file"))
    assert len(docs) == 4 and report.nul_documents == 1
    paragraphs, report = read_documents(config(damaged, tmp_path, doc_split="blank_line"))
    assert [p.split("\n")[0] for p in paragraphs] == ["line 0 of the king and the queen of love",
                                                       "line 101 of the king and the queen of love"]
    assert report.nul_documents_by_file == {str(damaged): 1}
    jsonl = tmp_path / "j" / "a.jsonl"
    jsonl.parent.mkdir()
    lines = [json.dumps({"text": f"document {i} of the queen"}).encode() for i in range(300)]
    jsonl.write_bytes(b"\n".join([*lines, b'{"text": "bad\x00"}', *lines]) + b"\n")
    docs, report = read_documents(DataConfig(source="jsonl", path=str(jsonl)))
    assert len(docs) == 600 and (report.nul_documents, report.nul_documents_by_file) == (1, {str(jsonl): 1})


def test_nul_bytes_past_the_first_8_kib_with_on_binary_error_name_the_file_and_byte(tmp_path, ray_local):
    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    offset = text_with_nul_past_the_probe(corpus / "damaged.txt")
    with pytest.raises(SourceError, match=rf"damaged\.txt:300 holds a NUL byte \(at byte {offset} of .*damaged\.txt\)"
                                          r".*data\.on_binary=skip"):
        prepare(config(corpus, tmp_path / "out", doc_split="line", on_binary="error"))
    with pytest.raises(SourceError, match=rf"holds a NUL byte \(at byte {offset} of .*damaged\.txt\)"):
        read_documents(config(corpus, tmp_path, doc_split="file", on_binary="error"))


def test_a_deeply_nested_json_line_names_the_file_and_line(tmp_path, ray_local):
    corpus = tmp_path / "j"
    corpus.mkdir()
    good = "\n".join(json.dumps({"text": f"the king and the queen, document {i}"}) for i in range(50))
    (corpus / "a.jsonl").write_text(good + "\n")
    (corpus / "b.jsonl").write_text(good + "\n" + '{"text": ' + "[" * 100_000 + "\n")
    with pytest.raises(SourceError, match=r"b\.jsonl:51 nests JSON arrays or objects deeper than the parser can "
                                          r"follow .*fix the line or remove it"):
        prepare(config(corpus, tmp_path / "out", source="jsonl"))
    (corpus / "b.jsonl").write_text(good + "\n" + '{"text": "x", "n": ' + "7" * 5000 + "}\n")
    with pytest.raises(SourceError, match=r"b\.jsonl:51 is not valid JSON \(Exceeds the limit .*fix the line"):
        read_documents(config(corpus, tmp_path, source="jsonl"))


def test_undecodable_bytes_are_reported_per_file_in_the_log_and_the_manifest(tmp_path, ray_local, caplog):
    corpus = make_corpus(tmp_path / "corpus", n_docs=N_DOCS)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, the king's dessert".encode("latin-1"))
    (corpus / "torn.txt").write_bytes(b"the queen \xff\xfe\xfd of love \xc3\x28 night")
    with caplog.at_level(logging.WARNING):
        out = prepare(config(corpus, tmp_path / "out"))
    stats = load_manifest(out).stats
    expected = {str(corpus / "torn.txt"): 4, str(corpus / "latin1.txt"): 4}
    assert stats["undecodable_bytes_by_file"] == expected and stats["undecodable_bytes"] == 8
    assert f"{corpus / 'torn.txt'}: 4 undecodable bytes" in caplog.text
    assert f"{corpus / 'latin1.txt'}: 4 undecodable bytes" in caplog.text
    assert "8 undecodable bytes (not UTF-8) in 2 documents" in caplog.text


def test_the_log_names_at_most_the_files_with_the_most_undecodable_bytes(tmp_path, caplog):
    for i in range(REPORTED_FILES + 5):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"f{i:02d}.txt").write_bytes(b"text " + b"\xff" * (i + 1))
    with caplog.at_level(logging.WARNING, logger="data_prep.sources"):
        _, report = read_documents(DataConfig(source="text", path=str(tmp_path / "c")))
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("  ")]
    assert len(named) == REPORTED_FILES + 1
    assert named[0] == f"  {tmp_path / 'c' / 'f24.txt'}: 25 undecodable bytes"
    assert named[-1] == "  and 5 more files: 15 undecodable bytes"  # f00..f04: 1 + 2 + 3 + 4 + 5
    assert report.bad_bytes == sum(range(1, REPORTED_FILES + 6))


@pytest.mark.parametrize("doc_split", ["line", "file", "blank_line"])
def test_a_document_longer_than_max_document_bytes_is_named_not_held_in_memory(tmp_path, doc_split):
    """A file of gigabytes without a line break would fill a worker's memory as one line (or one document): the
    reader stops at data.max_document_bytes and names the file and the byte."""
    from data_prep.decode_report import DecodeReport
    from data_prep.partitions import Piece
    from data_prep.sources import text_piece

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a short line\n" + b"x" * 5000 + b"\nanother line\n")
    cfg = config(corpus, tmp_path / "out", doc_split=doc_split, max_document_bytes=4096)
    src = source_configs(cfg)[0]
    with pytest.raises(SourceError, match=r"corpus.txt.* more than 4096 bytes.*data.max_document_bytes"):
        list(text_piece(src, Piece(str(corpus)), cfg, DecodeReport(), "data"))
    roomy = config(corpus, tmp_path / "out", doc_split=doc_split, max_document_bytes=8192)
    assert len("".join(text_piece(src, Piece(str(corpus)), roomy, DecodeReport(), "data"))) > 5000


@pytest.mark.parametrize("on_binary", ["skip", "error"])
def test_a_nul_character_from_a_json_escape_or_a_parquet_value_is_handled_like_a_nul_byte(tmp_path, on_binary):
    """No NUL byte in the file, but a NUL character in the text all the same: a JSON string's \\u0000 escape, a
    parquet value. Handled as data.on_binary says, like a NUL byte."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.decode_report import DecodeReport
    from data_prep.partitions import Piece
    from data_prep.sources import jsonl_piece, parquet_piece

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "clean text"}) + "\n" + json.dumps({"text": "bin\u0000ary"}) + "\n")
    assert b"\0" not in jsonl.read_bytes()
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["clean text", "bin\u0000ary"]}), table)
    cases = [("jsonl", jsonl, jsonl_piece, Piece(str(jsonl))), ("parquet", table, parquet_piece,
                                                                Piece(str(table), row_group=0))]
    for source, path, reader, piece in cases:
        cfg = config(path, tmp_path / "out", source=source, on_binary=on_binary)
        src, report = source_configs(cfg)[0], DecodeReport()
        if on_binary == "error":
            with pytest.raises(SourceError, match=r"holds a NUL character.*data.on_binary=skip"):
                list(reader(src, piece, cfg, report, "data"))
            continue
        assert list(reader(src, piece, cfg, report, "data")) == ["clean text"]
        assert report.nul_documents == 1
