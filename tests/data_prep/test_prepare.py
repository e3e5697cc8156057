"""The prepare stage on small corpora: packing within partitions, determinism whatever the workers and engine,
idempotence, resumption, the lock, splits, and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import data_prep.build as build_module
import data_prep.dataset_store as dataset_store
import data_prep.encoding as encoding_module
import data_prep.partition_work as partition_work
from data_prep.decode_report import DecodeReport
from data_prep.encoding import RAY_DATA_MIN_CHARS_PER_WORKER, can_cut_documents, tokenize_engine
from data_prep.errors import SourceError
from data_prep.listing import source_configs
from data_prep.mixture import read_documents
from data_prep.partial import recorded_intact
from data_prep.partition_work import (
    PartitionRecord,
    PrepareContext,
    ReadContext,
    is_validation,
    partition_documents,
)
from data_prep.partitions import Partition, Piece, partition_inputs
from data_prep.prepare import DataPrepError, dataset_dir, is_complete, prepare
from data_prep.shards import SPLITS, WindowDataset, incomplete_reason, load_manifest, sha256_file
from data_prep.text_tokenizer import data_tokenizer
from data_prep.tokenizer import TokenizerError, load_tokenizer
from pipeline.config import DataConfig, TokenizerConfig
from pipeline.files import directory_lock

WINDOW = 17


def text_config(corpus, out, **kw) -> DataConfig:
    """Blocks of a few documents (data.block_bytes), so that a partition is tokenized in several blocks."""
    base = dict(name="t", source="text", path=str(corpus), context_length=WINDOW - 1, val_fraction=0.1,
                output_dir=str(out), tokenizer=TokenizerConfig(vocab_size=400), num_workers=2,
                shard_tokens=WINDOW * 100, block_bytes=2000)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory, ray_local):
    """One data set of one partition (the default data.partition_bytes), shared by the tests that only read it."""
    cfg = text_config(corpus, tmp_path_factory.mktemp("prepared"), keep_doc_boundaries=True)
    return cfg, prepare(cfg)


@pytest.fixture(scope="module")
def partitioned(corpus, tmp_path_factory, ray_local):
    """The corpus cut into several partitions of a few files each, with several shards in some partitions."""
    cfg = text_config(corpus, tmp_path_factory.mktemp("partitioned"), partition_bytes=4000, shard_tokens=WINDOW * 20,
                      keep_doc_boundaries=True, tokenize_engine="actors")
    return cfg, prepare(cfg)


def documents_by_partition(cfg: DataConfig) -> list[list[str]]:
    ctx = ReadContext.of(cfg)
    return [list(partition_documents(part, ctx, DecodeReport())) for part in partition_inputs(cfg)]


def joined(sp, docs: list[str]) -> list[int]:
    return [t for ids in sp.encode(docs) for t in [*ids, sp.eos_id()]]


def of_split(docs: list[str], split: str, val_fraction: float) -> list[str]:
    return [d for d in docs if is_validation(d, val_fraction) == (split == "validation")]


def tokens_by_partition(out, split: str) -> dict[int, np.ndarray]:
    """Each partition's kept tokens, read from its shards (named <split>-p<index>-<k>.bin) in manifest order."""
    ds = WindowDataset(out, split)
    parts: dict[int, list[np.ndarray]] = {}
    for info, array in zip(ds.shards, ds.arrays, strict=True):
        index = int(re.fullmatch(rf"{split}-p(\d{{6}})-\d{{3}}\.bin", info.file).group(1))
        parts.setdefault(index, []).append(np.asarray(array).reshape(-1))
    return {index: np.concatenate(arrays) for index, arrays in parts.items()}


def digests(directory) -> dict[str, str]:
    """sha256 of every file (hidden ones included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_windows_are_the_documents_joined_by_eos(prepared):
    cfg, out = prepared
    manifest = load_manifest(out)
    sp = load_tokenizer(manifest.tokenizer_path)
    assert manifest.window_length == WINDOW and manifest.dtype == "<u2" and manifest.vocab_size == 400
    assert manifest.stats["partitions"] == 1 and manifest.stats["empty_partitions"] == []
    docs, _ = read_documents(cfg)
    expected = {}
    for split in SPLITS:
        ds = WindowDataset(out, split)
        stream = ds.windows(np.arange(len(ds))).reshape(-1).tolist()
        expected[split] = joined(sp, of_split(docs, split, cfg.val_fraction))
        assert len(stream) > 0 and stream == expected[split][: len(stream)], split
        assert len(expected[split]) - len(stream) == manifest.stats["dropped_tail_tokens"][split] < WINDOW
        assert manifest.stats["tokens"][split] == len(expected[split])
    shards = [s.file for s in manifest.splits["train"]]
    assert shards == [f"train-p000000-{k:03d}.bin" for k in range(len(shards))] and len(shards) > 1
    assert all(s.n_windows <= 100 for s in manifest.splits["train"])  # shards of at most 100 windows
    n_val = manifest.stats["documents"]["validation"]
    assert 0 < n_val < len(docs) and manifest.stats["documents"]["train"] == len(docs) - n_val
    WindowDataset(out, "train").verify()
    # The training split's count of every token id (the unigram baseline), its dropped tail included.
    assert manifest.token_counts == {"file": "train_token_counts.npy", "split": "train",
                                     "sha256": sha256_file(out / "train_token_counts.npy")}
    counts = np.load(out / manifest.token_counts["file"])
    assert counts.dtype == np.int64 and np.array_equal(counts, np.bincount(expected["train"], minlength=400))


def test_each_partition_packs_its_own_documents(partitioned):
    """Partition by partition: its documents joined by EOS, cut into windows, its tail dropped, in its own
    shards; the manifest lists the partitions in order."""
    cfg, out = partitioned
    manifest = load_manifest(out)
    sp = load_tokenizer(manifest.tokenizer_path)
    per_partition = documents_by_partition(cfg)
    assert manifest.stats["partitions"] == len(per_partition) > 4 and manifest.stats["empty_partitions"] == []
    for split in SPLITS:
        kept = tokens_by_partition(out, split)
        dropped = 0
        for index, docs in enumerate(per_partition):
            expected = joined(sp, of_split(docs, split, cfg.val_fraction))
            n = len(expected) // WINDOW * WINDOW
            assert kept.get(index, np.zeros(0)).tolist() == expected[:n], (split, index)
            dropped += len(expected) - n
        assert manifest.stats["dropped_tail_tokens"][split] == dropped
        assert manifest.stats["tokens"][split] == sum(
            len(joined(sp, of_split(docs, split, cfg.val_fraction))) for docs in per_partition)
    names = [s.file for s in manifest.splits["train"]]
    assert names == sorted(names) and len(names) > len(per_partition)  # some partitions have several shards
    assert all(s.n_windows <= 20 for s in manifest.splits["train"])


def test_doc_starts_point_just_after_each_eos(prepared):
    _, out = prepared
    manifest = load_manifest(out)
    tokens = WindowDataset(out, "train").windows(np.arange(len(WindowDataset(out, "train")))).reshape(-1)
    starts = np.load(out / manifest.doc_starts["train"]["file"])
    expected = np.concatenate([[0], np.flatnonzero(tokens == manifest.eos_id) + 1])
    assert np.array_equal(starts, expected[expected < len(tokens)])


def test_doc_starts_of_several_partitions_are_shifted_by_the_tokens_before(partitioned):
    """Every partition's stream begins with a document; the partition's tail was dropped, so the next starts
    right after its last kept window."""
    _, out = partitioned
    manifest = load_manifest(out)
    for split in SPLITS:
        expected, offset = [], 0
        for _, tokens in sorted(tokens_by_partition(out, split).items()):
            within = np.concatenate([[0], np.flatnonzero(tokens == manifest.eos_id) + 1])
            expected.append(offset + within[within < len(tokens)])
            offset += len(tokens)
        starts = np.load(out / manifest.doc_starts[split]["file"])
        assert np.array_equal(starts, np.concatenate(expected)), split
        assert manifest.doc_starts[split]["n_documents"] == len(starts)


def test_output_is_byte_identical_with_one_or_two_workers_and_either_engine(partitioned, tmp_path, caplog):
    """Several partitions: 2 plain actors (the fixture), 1 actor with blocks of the default size, and 2 Ray Data
    workers write the same files, byte for byte."""
    cfg, two = partitioned
    one = prepare(dataclasses.replace(cfg, num_workers=1, block_bytes=DataConfig.block_bytes,
                                      output_dir=str(tmp_path / "one")))
    with caplog.at_level("INFO", logger="data_prep.prepare"):
        ray_data = prepare(dataclasses.replace(cfg, tokenize_engine="ray_data", output_dir=str(tmp_path / "ray_data")))
    n = load_manifest(two).stats["partitions"]
    assert n > 4 and f"tokenizing {n} partitions with 2 Ray workers (ray_data)" in caplog.text
    # Neither the worker count, the engine, the block size nor the location is part of the fingerprint.
    assert one.name == two.name == ray_data.name
    files = digests(two)
    assert "tokenizer.model" in files and "train-p000001-000.bin" in files
    assert digests(one) == files and digests(ray_data) == files


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
    assert dataset_dir(dataclasses.replace(cfg, partition_bytes=4000)) != first  # other partitions, other bytes
    assert dataset_dir(dataclasses.replace(cfg, num_workers=None)) == first
    assert dataset_dir(dataclasses.replace(cfg, block_bytes=1 << 20)) == first


def test_incomplete_data_set_is_rebuilt(prepared, tmp_path):
    cfg, first = prepared
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path))
    out = tmp_path / first.name
    shutil.copytree(first, out)
    shard = out / "train-p000000-001.bin"
    shard.write_bytes(shard.read_bytes()[:100])  # as if killed mid-copy
    assert prepare(cfg) == out
    assert digests(out) == digests(first)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary directory left


def test_existing_tokenizer_is_reused_and_a_changed_one_gives_a_new_data_set(prepared, tmp_path, ray_local):
    cfg, first = prepared
    model = tmp_path / "tok.model"
    shutil.copy(first / "tokenizer.model", model)
    reuse = dataclasses.replace(cfg, output_dir=str(tmp_path / "out"), keep_doc_boundaries=False,
                                tokenizer=TokenizerConfig(model_path=str(model)))
    out = prepare(reuse)
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()
    assert (out / "train-p000000-000.bin").read_bytes() == (first / "train-p000000-000.bin").read_bytes()
    # The fingerprint names the given tokenizer by content: the same file elsewhere finds the same data set,
    # a changed one names another (the old data set stays as it is).
    moved = tmp_path / "moved.model"
    shutil.copy(model, moved)
    assert dataset_dir(dataclasses.replace(reuse, tokenizer=TokenizerConfig(model_path=str(moved)))) == out
    model.write_bytes(model.read_bytes() + b"\0")
    assert dataset_dir(reuse) != out and is_complete(out)


def test_split_by_hash_does_not_depend_on_order():
    docs = [f"document number {i}" for i in range(400)]
    forward = {d: is_validation(d, 0.2) for d in docs}
    assert {d: is_validation(d, 0.2) for d in reversed(docs)} == forward
    assert 50 < sum(forward.values()) < 110
    assert all(forward[d] for d in docs if is_validation(d, 0.1))  # a larger fraction only adds documents
    assert not any(is_validation(d, 0.0) for d in docs)


def test_a_tiny_corpus_may_get_no_validation_window_and_is_told_so(tmp_path, ray_local, caplog):
    """No document is forced into validation: the split follows the hash alone, and prepare warns."""
    (tmp_path / "c").mkdir()
    docs = [f"the king {i} and the queen of love, night and day, sweet heart" for i in range(6)]
    for i, doc in enumerate(docs):
        (tmp_path / "c" / f"{i}.txt").write_text(doc)
    assert not any(is_validation(d, 0.01) for d in docs)
    cfg = DataConfig(name="t", source="text", path=str(tmp_path / "c"), context_length=8, val_fraction=0.01,
                     output_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(vocab_size=60, byte_fallback=False))
    with caplog.at_level("WARNING", logger="data_prep.prepare"):
        out = prepare(cfg)
    manifest = load_manifest(out)
    assert manifest.stats["documents"] == {"train": 6, "validation": 0} and manifest.splits["validation"] == []
    assert "validation loss cannot be measured" in caplog.text


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


def test_a_corpus_of_no_text_is_refused_and_leaves_nothing(prepared, tmp_path, ray_local):
    _, first = prepared
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "blank.txt").write_text("  \n\n")
    (tmp_path / "c" / "weights.txt").write_bytes(b"\x00\x01" * 100)
    cfg = DataConfig(name="t", source="text", path=str(tmp_path / "c"), context_length=8,
                     output_dir=str(tmp_path / "out"), tokenizer=TokenizerConfig(vocab_size=300))
    with pytest.raises(SourceError, match="holds no text to train the tokenizer on.*skipped as binary"):
        prepare(cfg)
    assert list((tmp_path / "out").iterdir()) == []
    given = dataclasses.replace(cfg, tokenizer=TokenizerConfig(model_path=str(first / "tokenizer.model")))
    with pytest.raises(SourceError, match=r"holds no non-empty document \(2 inputs read, 1 skipped as binary\)"):
        prepare(given)
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


def wait_until_the_actors_are_gone(ray, timeout: float = 30.0) -> None:
    """ray.kill returns before the actor's process is dead: wait until every CPU of the cluster is free again, so
    that no actor of the interrupted run still writes into its directory."""
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, "the interrupted run's actors are still alive"
        time.sleep(0.02)


def interrupt_after(cfg: DataConfig, partitions: int, monkeypatch, ray) -> Path:
    """Run prepare until `partitions` partitions are recorded, then interrupt it (KeyboardInterrupt, as a Ctrl-C
    would) and wait for its actors to be gone; returns the partial directory it leaves."""
    run_partitions = build_module.run_partitions

    def interrupted(*args, **kwargs):
        runs = run_partitions(*args, **kwargs)
        try:
            if partitions == 0:
                raise KeyboardInterrupt
            for done, item in enumerate(runs, 1):
                yield item
                if done == partitions:
                    raise KeyboardInterrupt
            raise KeyboardInterrupt  # every partition recorded, not yet merged
        finally:
            runs.close()  # as for a dying driver, the actors go

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "run_partitions", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg)
    wait_until_the_actors_are_gone(ray)
    out = dataset_dir(cfg)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.is_dir() and not (partial / "manifest.json").exists()
    return partial


def test_interrupted_run_resumes_its_unfinished_partitions_and_writes_the_same_bytes(partitioned, tmp_path, ray_local,
                                                                                   monkeypatch, caplog):
    cfg, reference = partitioned
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path))
    partial = interrupt_after(cfg, 2, monkeypatch, ray_local)
    recorded = sorted(int(p.stem[1:]) for p in (partial / "parts").glob("p*.json"))
    n = load_manifest(reference).stats["partitions"]
    assert 2 <= len(recorded) < n  # its actors may have finished a queued partition or two besides
    # A partition a killed worker had begun: shards without a record, deleted and written again.
    unfinished = next(i for i in range(n) if i not in recorded)
    (partial / f"train-p{unfinished:06d}-000.bin").write_bytes(b"half a shard")
    (partial / f"train-p{unfinished:06d}-007.bin").write_bytes(b"a shard the partition will not have")

    with caplog.at_level("INFO", logger="data_prep"):
        out = prepare(dataclasses.replace(cfg, num_workers=1))  # another worker count, same bytes
    assert out == dataset_dir(cfg) and not partial.exists()
    assert f"resuming an interrupted run: {len(recorded)} of {n} partitions are done" in caplog.text
    assert f"tokenizing {n - len(recorded)} partitions with 1 Ray workers" in caplog.text
    assert "reusing the tokenizer of the interrupted run" in caplog.text
    # Hidden files aside: a worker killed inside write_atomic leaves its temporary file behind (see
    # test_temporary_files_of_killed_workers_are_not_published).
    assert visible(digests(out)) == visible(digests(reference)) == digests(reference)


def visible(files: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in files.items() if not name.startswith(".")}


def test_temporary_files_of_killed_workers_are_not_published(prepared, tmp_path, ray_local, monkeypatch):
    cfg, first = prepared
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path))
    partial = interrupt_after(cfg, 0, monkeypatch, ray_local)  # the tokenizer trained, no partition done
    (partial / ".train-p000000-000.bin.tmp99999").write_bytes(b"half a shard")  # a worker killed mid-write
    assert prepare(cfg) == dataset_dir(cfg)
    assert digests(dataset_dir(cfg)) == digests(first)


def test_a_recorded_partition_whose_shard_was_damaged_is_done_again(prepared, tmp_path, ray_local, monkeypatch):
    cfg, first = prepared
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path))
    partial = interrupt_after(cfg, 1, monkeypatch, ray_local)  # the one partition recorded, nothing merged
    shard = partial / "train-p000000-001.bin"
    shard.write_bytes(shard.read_bytes()[:-5])  # damaged meanwhile (a full disk, a careless hand)
    out = prepare(cfg)
    assert incomplete_reason(out) is None
    assert digests(out) == digests(first)


def test_a_bug_on_a_worker_keeps_the_partial_data_set_and_reaches_the_caller_with_its_traceback(
        partitioned, tmp_path, ray_local, monkeypatch, caplog):
    """A ValueError that is not one of the pipeline's errors is a bug, not bad input: it reaches the caller as it
    is, with the worker's traceback, and the partitions finished before it stay in the partial directory, which
    the same command resumes once the bug is gone (the same bytes as a run that never failed)."""
    import data_prep.workers as workers_module
    from pipeline.errors import PipelineError

    cfg, reference = partitioned
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path), tokenize_engine="actors")
    n = load_manifest(reference).stats["partitions"]

    class BuggyWorker(workers_module.PartitionWorker):
        def process(self, index: int) -> dict:
            if index == n - 1:
                raise ValueError("a bug in the worker's code")
            return super().process(index)

    with monkeypatch.context() as patch:
        patch.setattr(workers_module, "PartitionWorker", BuggyWorker)  # run_actors makes its actors of this class
        with pytest.raises(ValueError, match="a bug in the worker's code") as caught:
            prepare(cfg)
    wait_until_the_actors_are_gone(ray_local)
    assert not isinstance(caught.value, PipelineError)
    remote = str(caught.value)  # Ray's error: the worker's traceback, down to the line that raised
    assert "BuggyWorker.process" in remote and 'raise ValueError("a bug in the worker\'s code")' in remote
    assert "_build" in {entry.name for entry in caught.traceback}  # and the driver's, through the build
    out = dataset_dir(cfg)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.is_dir()
    recorded = sorted(int(p.stem[1:]) for p in (partial / "parts").glob("p*.json"))
    assert recorded and n - 1 not in recorded

    with caplog.at_level("INFO", logger="data_prep"):
        assert prepare(cfg) == out
    assert f"resuming an interrupted run: {len(recorded)} of {n} partitions are done" in caplog.text
    assert not partial.exists() and digests(out) == digests(reference)


def test_bad_input_met_on_a_worker_is_named_and_leaves_nothing(prepared, corpus, tmp_path, ray_local):
    """A SourceError raised on a worker (here: a NUL byte past the binary probe, data.on_binary=error) says the
    corpus is at fault: prepare stops naming the file and the fix, and leaves no partial data set behind."""
    _, first = prepared
    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    (root / "zz.txt").write_bytes(b"plain text\n" * 1000 + b"bin\x00ary\n")  # the last file, in a partition of its own
    cfg = text_config(root, tmp_path / "out", partition_bytes=4000, on_binary="error", tokenize_engine="actors",
                      tokenizer=TokenizerConfig(model_path=str(first / "tokenizer.model")))
    assert len(partition_inputs(cfg)) > 2
    with pytest.raises(SourceError, match=r"zz.txt holds a NUL byte .*data.on_binary=skip"):
        prepare(cfg)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_second_run_waits_for_the_lock_and_finds_the_data_set_finished(prepared, tmp_path, caplog):
    """Two runs of one config: the second waits on the partial directory's lock; when the first has published
    the data set, the second returns it without preparing anything."""
    cfg, first = prepared
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path))
    out = dataset_dir(cfg)
    partial = out.with_name(out.name + ".partial")
    result = []
    with caplog.at_level("INFO"):
        with directory_lock(partial):  # the first run, preparing
            thread = threading.Thread(target=lambda: result.append(prepare(cfg)))
            thread.start()
            deadline = time.time() + 30
            while "waiting for it to finish" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
            assert "waiting for it to finish" in caplog.text and thread.is_alive() and not result
            shutil.copytree(first, out)  # the first run publishes its data set
        thread.join(timeout=30)
    assert result == [out] and not partial.exists()
    assert "already prepared" in caplog.text and digests(out) == digests(first)


def test_second_run_waits_for_the_lock(tmp_path):
    directory = tmp_path / "d.partial"
    events = []

    def second():
        with directory_lock(directory):
            events.append("second has the lock")

    with directory_lock(directory):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        events.append("first releases")
    thread.join(timeout=10)
    assert events == ["first releases", "second has the lock"]


def test_a_50_mb_single_line_document_is_encoded_in_pieces(prepared, tmp_path, ray_local):
    from corpora import WORDS

    _, first = prepared
    rng = random.Random(0)
    text = " ".join(rng.choices(WORDS, k=12_200_000))
    assert len(text) >= 50_000_000 and "\n" not in text
    (tmp_path / "big.txt").write_text(text)
    cfg = DataConfig(name="big", source="text", path=str(tmp_path / "big.txt"), doc_split="line", val_fraction=0.0,
                     context_length=128, output_dir=str(tmp_path / "out"), num_workers=2,
                     tokenizer=TokenizerConfig(model_path=str(first / "tokenizer.model")))
    out = prepare(cfg)
    # The worker encodes it in pieces cut before spaces (its log stays on the worker): this model allows it.
    assert can_cut_documents((out / "tokenizer.model").read_bytes())
    assert len(text) > 40 * encoding_module._SEGMENT_CHARS
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
    assert (out / "train-p000000-000.bin").stat().st_size == 64 + 4 * train.shards[0].n_tokens


def progress_record(index: int, tokens: int) -> PartitionRecord:
    zero = dict.fromkeys(SPLITS, 0)
    return PartitionRecord(index=index, source=0, shards={s: [] for s in SPLITS}, documents_read=3, documents=zero,
                           tokens={"train": tokens, "validation": 0}, dropped_tail_tokens=zero, input_bytes=500)


def test_progress_bar_shows_tokens_per_second_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = build_module.Progress(total_bytes=1000, partitions=2)
    time.sleep(0.2)  # past tqdm's minimum refresh interval
    progress.update(Partition(0, 0, (Piece("a.txt"),), 500), progress_record(0, 2_000_000))
    progress.close()
    shown = terminal.getvalue()
    assert "prepare" in shown and "50%" in shown and re.search(r"[\d.]+M tokens/s", shown)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar (the log line remains)
    quiet = build_module.Progress(total_bytes=1000, partitions=1)
    quiet.update(Partition(0, 0, (Piece("a.txt"),), 1000), progress_record(0, 10))
    quiet.close()
    assert sys.stderr.getvalue() == ""


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_undecodable_bytes_and_binary_files_are_counted_in_the_manifest(corpus, tmp_path, ray_local, policy):
    shutil.copytree(corpus, tmp_path / "c")
    (tmp_path / "c" / "broken.txt").write_bytes(b"the king \xff\xfe and the \xc3\x28 queen " * 20)
    blob = tmp_path / "c" / "blob.bin"  # first in sorted order, and larger than a partition: one of its own
    blob.write_bytes(b"\x00" + random.Random(0).randbytes(5000))
    out = prepare(text_config(tmp_path / "c", tmp_path / "out", on_decode_error=policy, partition_bytes=4000))
    stats = load_manifest(out).stats
    assert (stats["undecodable_bytes"], stats["undecodable_documents"]) == (60, 1)
    assert stats["skipped_documents"] == (1 if policy == "skip" else 0)
    assert sum(stats["documents"].values()) == 60 + (policy == "replace")
    assert stats["binary_files_skipped"] == [str(blob)]
    assert stats["empty_partitions"] == [str(blob)] and stats["partitions"] > 2


def test_a_unigram_tokenizer_gives_the_same_tokens_for_documents_cut_in_pieces(corpus_maker, tmp_path, ray_local):
    """data.tokenizer.type=unigram end to end; documents longer than the piece size are cut before spaces and
    still give the tokens of the whole document (pieces never span a space for a model split at whitespace)."""
    long_docs = corpus_maker(tmp_path / "long", n_docs=6, lines=700, seed=4)
    cfg = text_config(long_docs, tmp_path / "out", val_fraction=0.0, block_bytes=DataConfig.block_bytes,
                      tokenizer=TokenizerConfig(type="unigram", vocab_size=340))
    out = prepare(cfg)
    manifest = load_manifest(out)
    sp = load_tokenizer(manifest.tokenizer_path)
    assert sp.serialized_model_proto() == (out / "tokenizer.model").read_bytes()
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(sp.serialized_model_proto())
    assert model.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    assert can_cut_documents(sp.serialized_model_proto())  # so the long documents were cut
    docs, _ = read_documents(cfg)
    assert sum(len(d) > encoding_module._SEGMENT_CHARS for d in docs) >= 3
    expected = joined(sp, docs)
    ds = WindowDataset(out, "train")
    stream = ds.windows(np.arange(len(ds))).reshape(-1).tolist()
    assert len(stream) > 0 and stream == expected[: len(stream)]
    assert manifest.stats["tokens"]["train"] == len(expected)


def test_partitions_from_a_node_that_does_not_see_the_directory_travel_through_the_object_store(partitioned,
                                                                                              tmp_path):
    """A worker whose node lacks the driver's mark (no shared file system) uploads each partition to the store and
    keeps nothing; the driver (here: resuming after a kill, from the staged records alone) downloads the same
    bytes that a worker seeing the directory wrote, and a shard damaged in the store is named, not taken."""
    from pipeline.cluster.storage import Mirror, StorageError

    cfg, out = partitioned
    tokenizer = data_tokenizer(load_manifest(out))
    sources = source_configs(cfg)
    # The same partial directory on two nodes that share no disk: node b's workers push, the driver pulls.
    node_b, driver = (tmp_path / node / "data" / f"{out.name}.partial" for node in ("node_b", "driver"))
    mirror = Mirror(f"file://{tmp_path / 'store'}", data_root=driver.parent)
    store = mirror.store
    ctx = PrepareContext(cfg, sources, ["data"] * len(sources), str(node_b), tokenizer.file_name, tokenizer.data,
                         tokenizer.specials, load_manifest(out).dtype, tokenizer.vocab_size, tokenizer.cut_documents,
                         driver_mark=".driver-test", store_uri=store.uri)
    plan = partition_inputs(cfg)
    assert len(plan) > 2
    for part in plan:
        partition_work.process_partition(part, ctx, tokenizer)
    assert not [p for p in node_b.rglob("*") if p.is_file()], "the node kept files nobody will read"
    assert sorted(store.files(f"data/{out.name}")) == sorted(p.name for p in out.glob("*-p*.bin"))
    staged = store.files(f"data/{out.name}.partial")
    assert {f"parts/p{part.index:06d}.json" for part in plan} <= set(staged) and all(n.startswith("parts/") for n in staged)

    driver_ctx = dataclasses.replace(ctx, directory=str(driver))
    dataset_store.fetch_staged(mirror, driver_ctx, plan)
    assert {p.name: sha256_file(p) for p in driver.glob("*.bin")} == {p.name: sha256_file(p) for p in out.glob("*.bin")}
    assert all(recorded_intact(driver, part.index, ctx.dtype) for part in plan)

    victim = sorted(driver.glob("train-p*.bin"))[-1]
    record = partition_work.record_path(driver, int(victim.name.split("-p")[1][:6]))
    record.unlink()
    victim.unlink()
    stored = Path(store.path(f"data/{out.name}/{victim.name}"))
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    with pytest.raises(StorageError, match=rf"{victim.name}.*not the .* recorded when it was written"):
        dataset_store.fetch_staged(mirror, driver_ctx, plan)
    assert not victim.exists() and not record.exists() and not list(driver.glob(".*download*"))
