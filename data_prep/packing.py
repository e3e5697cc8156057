"""Packing: each document's tokens followed by EOS, concatenated in document order, cut into windows of T+1 tokens.

A window w gives the training pair input = w[:-1], target = w[1:]. Windows do not overlap; the tail shorter
than a window is carried into the next push and, at the end, dropped (and counted).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def join_with_eos(
    documents: Sequence[Sequence[int]], eos_id: int, dtype: np.dtype, ends: Sequence[bool] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(stream, lengths): the documents' ids each followed by EOS as one flat array, and each document's
    length in that stream (EOS included). With `ends`, only the pieces whose flag is set are followed by EOS
    (a long document encoded in pieces gets one EOS, after its last piece)."""
    eos = np.ones(len(documents), dtype=np.int64) if ends is None else np.asarray(ends, dtype=np.int64)
    lengths = np.fromiter((len(doc) for doc in documents), dtype=np.int64, count=len(documents)) + eos
    stream = np.empty(int(lengths.sum()), dtype=dtype)
    ends_at = np.cumsum(lengths)
    stream[(ends_at - 1)[eos.astype(bool)]] = eos_id
    for doc, end, length, tail in zip(documents, ends_at.tolist(), lengths.tolist(), eos.tolist(), strict=True):
        stream[end - length : end - tail] = doc
    return stream, lengths


class WindowPacker:
    """Cuts a token stream, fed in pieces, into (n, window_length) windows; the tail waits for the next piece."""

    def __init__(self, window_length: int, eos_id: int, dtype: np.dtype = np.int64):
        self.window_length = window_length
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)
        self.carry = np.empty(0, dtype=self.dtype)

    def push(self, stream: np.ndarray) -> np.ndarray:
        """The windows completed by this piece of the stream, shape (n, window_length)."""
        if len(self.carry):
            stream = np.concatenate([self.carry, np.asarray(stream, dtype=self.dtype)])
        n = len(stream) // self.window_length
        self.carry = np.array(stream[n * self.window_length :], dtype=self.dtype)
        return stream[: n * self.window_length].reshape(n, self.window_length)

    def pack(self, documents: Sequence[Sequence[int]]) -> np.ndarray:
        """The windows completed by these documents (each followed by EOS)."""
        stream, _ = join_with_eos(documents, self.eos_id, self.dtype)
        return self.push(stream)

    @property
    def dropped_tokens(self) -> int:
        """Tokens waiting for a window: dropped if the stream ends here."""
        return len(self.carry)
