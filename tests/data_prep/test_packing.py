"""Packing: EOS after every document, windows of T+1 cut from the concatenation, the tail dropped."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.packing import WindowPacker, join_with_eos


def test_join_with_eos_appends_eos_to_every_document():
    stream, lengths = join_with_eos([[5, 6], [], [7]], eos_id=2, dtype=np.uint16)
    assert stream.dtype == np.uint16
    assert stream.tolist() == [5, 6, 2, 2, 7, 2]
    assert lengths.tolist() == [3, 1, 2]


def test_join_with_eos_refuses_ids_beyond_the_dtype():
    with pytest.raises(OverflowError):
        join_with_eos([[70_000]], eos_id=2, dtype=np.uint16)


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


def test_windows_do_not_depend_on_how_the_stream_is_cut():
    stream = np.arange(1000, dtype=np.uint16)
    whole = WindowPacker(7, eos_id=2, dtype=np.uint16).push(stream)
    packer = WindowPacker(7, eos_id=2, dtype=np.uint16)
    cuts = [0, 3, 4, 50, 51, 400, 999, 1000]
    pieces = [packer.push(stream[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert np.array_equal(np.concatenate(pieces), whole)
    assert whole.shape == (142, 7) and packer.dropped_tokens == 1000 - 142 * 7
    assert whole[1, 0] == whole[0, -1] + 1  # non-overlapping, consecutive
