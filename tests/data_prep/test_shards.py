"""The shard format: round trip, refusal of what the reader does not understand, detection of damage."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.packing import WindowPacker
from data_prep.shards import (
    HEADER_BYTES,
    ShardError,
    WindowDataset,
    dtype_for_vocab,
    encode_header,
    write_synthetic_dataset,
)


def make_dataset(tmp_path, n=40, window=9, vocab=1000, val=4):
    windows = np.random.default_rng(0).integers(0, vocab, size=(n, window))
    return write_synthetic_dataset(tmp_path / "ds", windows, vocab, val_windows=val), windows


def test_round_trip_across_shards(tmp_path):
    windows = np.arange(50 * 7).reshape(50, 7) % 300
    root = write_synthetic_dataset(tmp_path / "ds", windows, 300, shard_windows=16)
    ds = WindowDataset(root, "train")
    assert [s.n_windows for s in ds.shards] == [16, 16, 16, 2]
    assert len(ds) == 50
    idx = np.array([0, 15, 16, 33, 49, 3])
    assert np.array_equal(ds.windows(idx), windows[idx])
    with pytest.raises(IndexError):
        ds.windows(np.array([50]))


def test_shards_are_memmappable_with_numpy_alone(tmp_path):
    root, windows = make_dataset(tmp_path)
    raw = np.memmap(root / "train_00000.bin", dtype="<u2", mode="r", offset=HEADER_BYTES).reshape(-1, 9)
    assert np.array_equal(raw, windows[4:])


def test_dtype_follows_vocabulary():
    assert dtype_for_vocab(65_535) == np.dtype("<u2")
    assert dtype_for_vocab(65_536) == np.dtype("<u4")
    with pytest.raises(ValueError, match="uint32"):
        dtype_for_vocab(2**33)


def test_truncated_shard_is_named(tmp_path):
    root, _ = make_dataset(tmp_path)
    shard = root / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match="train_00000.bin is truncated"):
        WindowDataset(root, "train")


def test_unknown_version_is_refused(tmp_path):
    root, _ = make_dataset(tmp_path)
    shard = root / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[:HEADER_BYTES] = encode_header(2, 9, 36).replace(b"\x01\x00\x00\x00", b"\x07\x00\x00\x00", 1)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="format version 7"):
        WindowDataset(root, "train")


def test_corruption_is_caught_by_verify(tmp_path):
    root, _ = make_dataset(tmp_path)
    shard = root / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = WindowDataset(root, "train")  # sizes still match: only the checksum can tell
    with pytest.raises(ShardError, match="train_00000.bin fails its checksum"):
        ds.verify()
    WindowDataset(root, "validation").verify()


def test_packing_puts_eos_between_documents_and_carries_the_tail():
    packer = WindowPacker(window_length=4, eos_id=2)
    first = packer.pack([np.array([10, 11, 12]), np.array([20])])
    assert first.tolist() == [[10, 11, 12, 2]]
    second = packer.pack([np.array([30, 31, 32, 33])])
    assert second.tolist() == [[20, 2, 30, 31]]
    assert packer.dropped_tokens == 3  # 32, 33, EOS
    window = second[0]
    inputs, targets = window[:-1], window[1:]
    assert inputs.tolist() == [20, 2, 30] and targets.tolist() == [2, 30, 31]
