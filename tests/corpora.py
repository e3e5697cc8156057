"""Small synthetic corpora of random words for the data and mixture tests."""

from __future__ import annotations

import random

WORDS = [
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "I", "this", "are", "or", "his", "from", "at", "which", "king", "queen", "lord", "love", "night", "day",
    "sweet", "death", "heart", "good",
]


def make_corpus(root, n_docs: int = 60, lines: int = 12, seed: int = 0):
    """n_docs small text files of random words; some lines indented, some blank, as in real text."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        body = []
        for _ in range(lines):
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            body.append(("    " if rng.random() < 0.2 else "") + line.capitalize() + rng.choice([".", ",", "!", ""]))
            if rng.random() < 0.15:
                body.append("")
        (root / f"doc_{i:03d}.txt").write_text("\n".join(body))
    return root
