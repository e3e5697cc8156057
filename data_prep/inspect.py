"""`pipeline data inspect <dataset dir> [--verify]`: what a prepared data set holds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_prep.shards import ShardError, WindowDataset, load_manifest
from data_prep.tokenizer import load_tokenizer


def describe(dataset_dir: Path, n_windows: int = 2, top: int = 15) -> str:
    manifest = load_manifest(dataset_dir)
    sp = load_tokenizer(manifest.tokenizer_path)
    lines = [
        f"data set {dataset_dir}",
        f"  format v{manifest.format_version}, vocabulary {manifest.vocab_size} ({manifest.dtype}), "
        f"windows of {manifest.window_length} tokens, tokenizer sha256 {manifest.tokenizer_sha256[:16]}...",
    ]
    stats = manifest.stats
    for split, shards in manifest.splits.items():
        windows = sum(s.n_windows for s in shards)
        docs = stats.get("documents", {}).get(split, "?")
        lines.append(f"  {split}: {docs} documents, {len(shards)} shards, {windows} windows, "
                     f"{windows * manifest.window_length} tokens")
    train = WindowDataset(dataset_dir, "train")
    sample = train.windows(np.arange(min(len(train), 2000)))
    counts = np.bincount(sample.reshape(-1), minlength=manifest.vocab_size)
    used = int((counts > 0).sum())
    lines.append(f"  token histogram (first {len(sample)} train windows): {used} of {manifest.vocab_size} ids used; "
                 f"most frequent:")
    for token in np.argsort(counts)[::-1][:top]:
        lines.append(f"    {int(token):>6} {sp.id_to_piece(int(token))!r:<16} {counts[token] / counts.sum():7.2%}")
    for i in range(min(n_windows, len(train))):
        lines.append(f"  --- train window {i} ---")
        lines.append("  " + sp.decode(train.windows(np.array([i]))[0].tolist()).replace("\n", "\n  "))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline data inspect", description=__doc__)
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    parser.add_argument("--windows", type=int, default=2, help="decoded windows to show")
    args = parser.parse_args(argv)
    try:
        print(describe(args.dataset_dir, args.windows))
        if args.verify:
            for split in load_manifest(args.dataset_dir).splits:
                WindowDataset(args.dataset_dir, split).verify()
            print("  checksums: every shard matches its sha256")
    except (ShardError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
