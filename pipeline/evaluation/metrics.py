"""Validation totals and the tokens' byte lengths (for bits per byte), shared by pipeline evaluate and the
validation that runs on the training workers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class LossTotals:
    nats: float
    tokens: int
    bytes: int

    @property
    def mean_loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(1, self.bytes)


def token_byte_lengths(sp) -> np.ndarray:
    """UTF-8 bytes each token stands for (byte-fallback pieces are one byte; control tokens none)."""
    lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return lengths
