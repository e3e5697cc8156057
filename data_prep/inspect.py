"""`pipeline data inspect <dataset dir> [--verify]`: what a prepared data set holds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_prep.blend import component_dirs, is_blend, load_blend
from data_prep.shards import ShardError, WindowDataset, load_manifest, verify_dataset
from data_prep.text_tokenizer import data_tokenizer
from data_prep.tokenizer import TokenizerError

# Windows read for the token histogram: enough for a stable picture, cheap on any data set.
_HISTOGRAM_WINDOWS = 2000


def describe_blend(blend_dir: Path) -> str:
    blend = load_blend(blend_dir)
    lines = [f"blend {blend_dir}: {len(blend.components)} data sets sampled by weight, vocabulary {blend.vocab_size}, "
             f"windows of {blend.window_length} tokens, tokenizer sha256 {blend.tokenizer_sha256[:16]}..."]
    for c in blend.components:
        lines.append(f"  {c.name}: weight {c.weight:g} (share {c.share:.1%}), {c.windows.get('train', 0)} train / "
                     f"{c.windows.get('validation', 0)} validation windows in {blend.component_dir(c)}")
    return "\n".join(lines)


def describe(dataset_dir: Path, n_windows: int = 2, top: int = 15) -> str:
    if is_blend(dataset_dir):
        return describe_blend(dataset_dir)
    manifest = load_manifest(dataset_dir)
    tokenizer = data_tokenizer(manifest)
    lines = [
        f"data set {dataset_dir}",
        f"  format v{manifest.format_version}, vocabulary {manifest.vocab_size} ({manifest.dtype}), "
        f"windows of {manifest.window_length} tokens, tokenizer sha256 {manifest.tokenizer_sha256[:16]}...",
    ]
    if manifest.source:
        lines.append(f"  source: {manifest.source.get('kind')} {manifest.source.get('path') or ''} "
                     f"({manifest.source.get('files')} files)")
    stats = manifest.stats
    for split, shards in manifest.splits.items():
        windows = sum(s.n_windows for s in shards)
        docs = stats.get("documents", {}).get(split, "?")
        dropped = stats.get("dropped_tail_tokens", {}).get(split, "?")
        lines.append(f"  {split}: {docs} documents, {len(shards)} shards, {windows} windows, "
                     f"{windows * manifest.window_length} tokens ({dropped} tail tokens dropped)")
    if stats.get("undecodable_documents"):
        lines.append(f"  undecodable input: {stats.get('undecodable_bytes', '?')} bytes in "
                     f"{stats['undecodable_documents']} documents ({stats.get('skipped_documents', 0)} skipped)")
    train = WindowDataset(dataset_dir, "train")
    sample = train.windows(np.arange(min(len(train), _HISTOGRAM_WINDOWS)))
    counts = np.bincount(sample.reshape(-1), minlength=manifest.vocab_size)
    used = int((counts > 0).sum())
    lines.append(f"  token histogram (first {len(sample)} train windows): {used} of {manifest.vocab_size} ids used; "
                 f"most frequent:")
    for token in np.argsort(counts, kind="stable")[::-1][:top]:
        piece = tokenizer.piece(int(token))
        lines.append(f"    {int(token):>6} {piece!r:<18} {tokenizer.decode([int(token)])!r:<16} "
                     f"{counts[token] / max(counts.sum(), 1):7.2%}")
    for i in range(min(n_windows, len(train))):
        lines.append(f"  --- train window {i} ---")
        lines.append("  " + tokenizer.decode(train.windows(np.array([i]))[0].tolist()).replace("\n", "\n  "))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipeline data inspect", description=__doc__)
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--verify", action="store_true", help="check every file's sha256 against the manifest")
    parser.add_argument("--windows", type=int, default=2, help="decoded windows to show")
    args = parser.parse_args(argv)
    status = 0
    try:
        print(describe(args.dataset_dir, args.windows))
    except (ShardError, TokenizerError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        status = 1
    if args.verify and (is_blend(args.dataset_dir) or args.dataset_dir.joinpath("manifest.json").is_file()):
        problems = [p for d in component_dirs(args.dataset_dir) for p in verify_dataset(d)]
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return 1
        print("  checksums: every shard matches its sha256")
    return status
