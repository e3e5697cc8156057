"""Packing: documents' tokens, each followed by EOS, concatenated and cut into windows of T+1 tokens.

A window w gives the training pair input = w[:-1], target = w[1:]. The tail shorter than a window is
carried to the next call and finally dropped (and counted).
"""

from __future__ import annotations

import numpy as np


class WindowPacker:
    def __init__(self, window_length: int, eos_id: int):
        self.window_length = window_length
        self.eos_id = eos_id
        self.carry = np.empty(0, dtype=np.int64)

    def pack(self, documents: list[np.ndarray]) -> np.ndarray:
        """Windows completed by these documents, shape (n, window_length)."""
        eos = np.array([self.eos_id], dtype=np.int64)
        parts = [self.carry]
        for doc in documents:
            parts.append(np.asarray(doc, dtype=np.int64))
            parts.append(eos)
        stream = np.concatenate(parts)
        n = len(stream) // self.window_length
        self.carry = stream[n * self.window_length :]
        return stream[: n * self.window_length].reshape(n, self.window_length)

    @property
    def dropped_tokens(self) -> int:
        return len(self.carry)
