"""The shard format: round trip, refusal of what the reader does not understand, detection of damage."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from data_prep.shards import (
    HEADER_BYTES,
    MAGIC,
    VERIFIED_STAMP,
    ShardError,
    ShardWriter,
    WindowDataset,
    check_dataset_checksums,
    dtype_for_vocab,
    encode_header,
    incomplete_reason,
    load_manifest,
    read_header,
    verify_dataset,
    write_synthetic_dataset,
)


def make_dataset(tmp_path, n=40, window=9, vocab=1000, val=4):
    windows = np.random.default_rng(0).integers(0, vocab, size=(n, window))
    return write_synthetic_dataset(tmp_path / "ds", windows, vocab, val_windows=val), windows


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_across_shards(tmp_path):
    windows = np.arange(50 * 7).reshape(50, 7) % 300
    root = write_synthetic_dataset(tmp_path / "ds", windows, 300, shard_windows=16)
    ds = WindowDataset(root, "train")
    assert [s.n_windows for s in ds.shards] == [16, 16, 16, 2]
    assert len(ds) == 50 and ds.window_length == 7
    idx = np.array([0, 15, 16, 33, 49, 3, 16])  # unsorted, repeated, on shard edges
    got = ds.windows(idx)
    assert got.dtype == np.int64 and got.shape == (7, 7)
    assert np.array_equal(got, windows[idx])
    with pytest.raises(IndexError):
        ds.windows(np.array([50]))
    assert len(WindowDataset(root, "validation")) == 0
    assert incomplete_reason(root) is None


def test_shards_are_memmappable_with_numpy_alone(tmp_path):
    root, windows = make_dataset(tmp_path)
    raw = np.memmap(root / "train_00000.bin", dtype="<u2", mode="r", offset=HEADER_BYTES).reshape(-1, 9)
    assert np.array_equal(raw, windows[4:])
    magic, version, itemsize, window, n = struct.unpack("<8sIIIQ", (root / "train_00000.bin").read_bytes()[:28])
    assert (magic, version, itemsize, window, n) == (MAGIC, 1, 2, 9, 36)


def test_large_vocabulary_uses_uint32(tmp_path):
    windows = np.array([[0, 70_000, 4_000_000_000]])
    root = write_synthetic_dataset(tmp_path / "ds", windows, 4_000_000_001)
    assert load_manifest(root).dtype == "<u4"
    assert WindowDataset(root, "train").windows(np.array([0])).tolist() == windows.tolist()


def test_dtype_follows_vocabulary():
    assert dtype_for_vocab(65_535) == np.dtype("<u2")
    assert dtype_for_vocab(65_536) == np.dtype("<u4")
    with pytest.raises(ValueError, match="uint32"):
        dtype_for_vocab(2**33)


def test_writer_refuses_windows_of_the_wrong_length(tmp_path):
    writer = ShardWriter(tmp_path, "train", 5, np.dtype("<u2"), shard_windows=4)
    with pytest.raises(ValueError, match=r"expected \(n, 5\)"):
        writer.add(np.zeros((2, 6), dtype=np.int64))


def test_manifest_is_written_last_with_absolute_tokenizer_path(tmp_path):
    root, _ = make_dataset(tmp_path)
    manifest = load_manifest(root)
    assert manifest.tokenizer_path.is_absolute() and manifest.tokenizer_path.is_file()
    assert (manifest.eos_id, manifest.bos_id, manifest.pad_id) == (2, 1, 3)
    assert [s.n_windows for s in manifest.splits["train"]] == [36]
    assert not list(root.glob(".*.tmp*"))  # no temporary file left behind


def test_truncated_shard_is_named(tmp_path):
    root, _ = make_dataset(tmp_path)
    shard = root / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match="train_00000.bin is truncated"):
        WindowDataset(root, "train")
    assert "train_00000.bin" in incomplete_reason(root)
    shard.write_bytes(shard.read_bytes()[:20])  # not even a header left
    with pytest.raises(ShardError, match="train_00000.bin is truncated"):
        WindowDataset(root, "train")


def test_missing_shard_is_named(tmp_path):
    root, _ = make_dataset(tmp_path)
    (root / "validation_00000.bin").unlink()
    with pytest.raises(ShardError, match="validation_00000.bin is missing"):
        WindowDataset(root, "validation")


def test_unknown_version_is_refused(tmp_path):
    root, _ = make_dataset(tmp_path)
    shard = root / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[:HEADER_BYTES] = struct.pack("<8sIIIQ", MAGIC, 7, 2, 9, 36).ljust(HEADER_BYTES, b"\0")
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train_00000.bin has format version 7"):
        WindowDataset(root, "train")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ShardError, match="format version 99"):
        load_manifest(root)


def test_foreign_file_and_header_mismatch_are_refused(tmp_path):
    root, _ = make_dataset(tmp_path)
    shard = root / "train_00000.bin"
    body = shard.read_bytes()
    shard.write_bytes(b"NOTASHRD" + body[8:])
    with pytest.raises(ShardError, match="bad magic"):
        read_header(shard)
    # Same size, but the header claims another window length: refused before any training.
    shard.write_bytes(encode_header(2, 12, 27) + body[HEADER_BYTES:])
    with pytest.raises(ShardError, match="disagrees with the manifest"):
        WindowDataset(root, "train")


def test_corruption_is_caught_by_verify(tmp_path):
    root, _ = make_dataset(tmp_path)
    flip_byte(root / "train_00000.bin", HEADER_BYTES + 5)
    ds = WindowDataset(root, "train")  # sizes still match: only the checksum can tell
    with pytest.raises(ShardError, match="train_00000.bin fails its checksum"):
        ds.verify()
    WindowDataset(root, "validation").verify()
    problems = verify_dataset(root)
    assert len(problems) == 1 and "train_00000.bin fails its checksum" in problems[0]


def test_checksums_checked_before_training_hash_each_file_once(tmp_path):
    root, _ = make_dataset(tmp_path)
    assert check_dataset_checksums(root) == 3  # tokenizer, train and validation shard
    assert check_dataset_checksums(root) == 0  # all recorded in the stamp with their size and mtime
    stamp = json.loads((root / VERIFIED_STAMP).read_text())
    assert set(stamp) == {"tokenizer.model", "train_00000.bin", "validation_00000.bin"}
    # A byte flipped after the stamp changes the file's mtime: hashed again, and caught.
    flip_byte(root / "validation_00000.bin", HEADER_BYTES + 1)
    with pytest.raises(ShardError, match="validation_00000.bin fails its checksum"):
        check_dataset_checksums(root)
    flip_byte(root / "validation_00000.bin", HEADER_BYTES + 1)  # repaired
    assert check_dataset_checksums(root) == 1


def test_checksum_check_without_a_writable_stamp(tmp_path):
    root, _ = make_dataset(tmp_path)
    flip_byte(root / "tokenizer.model", 0)
    with pytest.raises(ShardError, match="tokenizer .*tokenizer.model fails its checksum"):
        check_dataset_checksums(root)
    flip_byte(root / "tokenizer.model", 0)
    (root / VERIFIED_STAMP).mkdir()  # the stamp cannot be written (as on read-only storage): checked every time
    assert check_dataset_checksums(root) == 3
    assert check_dataset_checksums(root) == 3


def test_damaged_manifest_is_explained(tmp_path):
    root, _ = make_dataset(tmp_path)
    (root / "manifest.json").write_text('{"format_version": 1, "vocab')
    with pytest.raises(ShardError, match="not valid JSON"):
        load_manifest(root)
    assert incomplete_reason(root) is not None
    with pytest.raises(FileNotFoundError, match="run `pipeline prepare`"):
        load_manifest(tmp_path)
