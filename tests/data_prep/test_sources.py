"""Document readers: the plays cut into scenes, text/jsonl/parquet/HF sources, undecodable bytes, bad input."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import SourceError
from data_prep.mixture import read_documents
from data_prep.partitions import partition_inputs
from data_prep.sources import split_scenes
from pipeline.config import DataConfig

PLAY = """# A Play

## ACT I

### SCENE I. A room.

**ONE**<BR>
First line,<BR>
second line.

### SCENE II. Another room.

**TWO**<BR>
Words.

## ACT II

#### SCENE I. A heath.

Storm.

# EPILOGUE

**PUCK**<BR>
Goodnight.
""".replace("<BR>", "  ")  # markdown line breaks: two trailing spaces


def test_scenes_keep_their_title_and_act_heading_and_lose_markdown_line_breaks():
    scenes = split_scenes(PLAY)
    assert len(scenes) == 4
    assert scenes[0].startswith("# A Play\n\n## ACT I\n\n### SCENE I. A room.")
    assert scenes[0].endswith("**ONE**\nFirst line,\nsecond line.")  # trailing double spaces gone
    assert scenes[1].startswith("### SCENE II.") and "## ACT II" not in scenes[1]
    assert scenes[2].startswith("## ACT II\n\n#### SCENE I. A heath.")
    assert scenes[3] == "# EPILOGUE\n\n**PUCK**\nGoodnight."


def test_shakespeare_is_the_38_plays_cut_into_scenes():
    docs, report = read_documents(DataConfig())
    assert report.files == 38
    assert 750 < len(docs) < 850
    assert 4_900_000 < sum(len(d) for d in docs) < 5_300_000
    assert any(d.startswith("# Hamlet\n\n## ACT I\n\n### SCENE I.") for d in docs)
    assert all(d.lstrip().startswith("#") for d in docs)  # every document opens with its heading
    assert not any("  \n" in d for d in docs)
    assert docs == read_documents(DataConfig())[0]  # same order every time


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_text_files_in_sorted_order_and_split_by_file_line_or_blank_line(tmp_path):
    write(tmp_path / "c" / "b.txt", "second file\nline two\n")
    write(tmp_path / "c" / "a.txt", "para one\nstill one\n\n  \npara two\n")
    write(tmp_path / "c" / ".hidden" / "x.txt", "never read")
    path = str(tmp_path / "c")
    by_file, report = read_documents(DataConfig(source="text", path=path))
    assert by_file == ["para one\nstill one\n\n  \npara two", "second file\nline two"] and report.files == 2
    by_line, _ = read_documents(DataConfig(source="text", path=path, doc_split="line"))
    assert by_line == ["para one", "still one", "para two", "second file", "line two"]
    by_para, _ = read_documents(DataConfig(source="text", path=path, doc_split="blank_line"))
    assert by_para == ["para one\nstill one", "para two", "second file\nline two"]
    by_glob, _ = read_documents(DataConfig(source="text", path=str(tmp_path / "c" / "b*.txt")))
    assert by_glob == ["second file\nline two"]


def test_undecodable_bytes_are_counted_and_replaced_or_skipped(tmp_path):
    write(tmp_path / "c" / "good.txt", "fine text")
    write(tmp_path / "c" / "bad.txt", b"broken \xff\xfe bytes")
    docs, report = read_documents(DataConfig(source="text", path=str(tmp_path / "c")))
    assert "broken \ufffd\ufffd bytes" in docs and "fine text" in docs
    assert (report.bad_bytes, report.bad_bytes_documents, report.skipped_documents) == (2, 1, 0)
    docs, report = read_documents(DataConfig(source="text", path=str(tmp_path / "c"), on_decode_error="skip"))
    assert docs == ["fine text"] and report.skipped_documents == 1
    # With one document per line, only the bad line is lost.
    write(tmp_path / "l" / "x.txt", b"ok one\nbad \xc3\x28 line\nok two\n")
    docs, report = read_documents(DataConfig(source="text", path=str(tmp_path / "l"), doc_split="line",
                                             on_decode_error="skip"))
    assert docs == ["ok one", "ok two"] and report.bad_bytes == 1


def test_empty_corpus_and_missing_files_are_refused(tmp_path):
    write(tmp_path / "empty" / "a.txt", "  \n\n")
    with pytest.raises(SourceError, match="holds no non-empty document"):
        read_documents(DataConfig(source="text", path=str(tmp_path / "empty")))
    with pytest.raises(SourceError, match="does not exist"):
        read_documents(DataConfig(source="text", path=str(tmp_path / "nowhere")))
    with pytest.raises(SourceError, match=r"names no .jsonl or .json files \(also compressed as .gz or .zst\)"):
        read_documents(DataConfig(source="jsonl", path=str(tmp_path / "empty")))


def test_jsonl_source_and_its_errors(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"body": "one"}\n\n{"body": ""}\n{"body": "two"}\n')
    docs, _ = read_documents(DataConfig(source="jsonl", path=str(path), text_field="body"))
    assert docs == ["one", "two"]
    with pytest.raises(SourceError, match=r"a.jsonl:1 has no field 'text' \(it has: body\)"):
        read_documents(DataConfig(source="jsonl", path=str(path)))
    write(path, '{"body": "one"}\n{"body": oops}\n')
    with pytest.raises(SourceError, match="a.jsonl:2 is not valid JSON"):
        read_documents(DataConfig(source="jsonl", path=str(path), text_field="body"))
    write(path, '{"body": ["a", "list"]}\n')
    with pytest.raises(SourceError, match="holds a list, not text"):
        read_documents(DataConfig(source="jsonl", path=str(path), text_field="body"))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", None, "y", ""], "n": [1, 2, 3, 4]}), tmp_path / "b.parquet")
    docs, _ = read_documents(DataConfig(source="parquet", path=str(tmp_path / "b.parquet")))
    assert docs == ["x", "y"]
    with pytest.raises(SourceError, match=r"no column 'body' \(columns: text, n\)"):
        read_documents(DataConfig(source="parquet", path=str(tmp_path / "b.parquet"), text_field="body"))


def test_hf_disk_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["alpha", "", "beta"]}).save_to_disk(str(tmp_path / "hf"))
    docs, _ = read_documents(DataConfig(source="hf_disk", path=str(tmp_path / "hf"), text_field="content"))
    assert docs == ["alpha", "beta"]
    # Row ranges of the saved data set: the same documents whatever the partition size.
    many = [f"row {i}" for i in range(500)]
    datasets.Dataset.from_dict({"content": many}).save_to_disk(str(tmp_path / "many"))
    cfg = DataConfig(source="hf_disk", path=str(tmp_path / "many"), text_field="content", partition_bytes=1000)
    assert len(partition_inputs(cfg)) > 2 and read_documents(cfg)[0] == many
    # A DatasetDict: data.hf_split names the split.
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["a train row"]}),
                          "test": datasets.Dataset.from_dict({"content": ["a test row"]})}).save_to_disk(
        str(tmp_path / "dict"))
    for split in ("train", "test"):
        docs, _ = read_documents(DataConfig(source="hf_disk", path=str(tmp_path / "dict"), text_field="content",
                                            hf_split=split))
        assert docs == [f"a {split} row"]
    with pytest.raises(SourceError, match="save_to_disk"):
        read_documents(DataConfig(source="hf_disk", path=str(tmp_path), text_field="content"))


def test_hf_hub_failure_says_what_to_do_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError, match="could not load 'someone/corpus'.*data.source=hf_disk"):
        read_documents(DataConfig(source="hf_hub", path="someone/corpus"))


def test_hf_hub_source_reads_what_load_dataset_returns(tmp_path, monkeypatch):
    """The hub path through the real datasets.load_dataset, offline: a data set repository laid out as on the
    hub (data files in a directory), named by its local path instead of a hub id."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "someone-corpus"
    (repo / "data").mkdir(parents=True)
    lines = [{"text": "first document"}, {"text": ""}, {"text": "second one"}]
    (repo / "data" / "train-00000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (repo / "data" / "test-00000.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    docs, report = read_documents(DataConfig(source="hf_hub", path=str(repo)))
    assert docs == ["first document", "second one"] and report.files == 1
    # data.hf_config, data.hf_revision and data.hf_split go to load_dataset (streamed, never downloaded whole).
    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **{**kwargs, "revision": None})  # a local directory has no revision to pin

    monkeypatch.setattr(datasets, "load_dataset", recording)
    docs, _ = read_documents(DataConfig(source="hf_hub", path=str(repo), hf_split="test", hf_revision="v1.0"))
    assert docs == ["held out"]
    assert calls and all(c == ((str(repo),), {"name": None, "revision": "v1.0", "split": "test", "streaming": True})
                         for c in calls)
    monkeypatch.setattr(datasets, "load_dataset", real)
    with pytest.raises(SourceError, match=r"no column 'body' \(columns: text\)"):
        read_documents(DataConfig(source="hf_hub", path=str(repo), text_field="body"))
