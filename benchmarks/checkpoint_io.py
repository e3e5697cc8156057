"""Checkpoint write and read throughput (MB/s) beside the disk's sequential write rate, in one run.

A DeepSpeed engine (1 rank, gloo, ZeRO stage from --zero) holds a GPT with >= 100 MB of state (weights plus
AdamW moments); its sharded checkpoint is saved through pipeline.checkpoint.save_load (which marks it complete)
and flushed to disk (every file fsynced before the COMPLETE marker), then loaded back cold: the checkpoint's
pages are dropped from the page cache first (posix_fadvise DONTNEED), so the read comes from the disk. The disk
baselines write the same number of bytes sequentially with fsync, and read them back cold. Save, load and the
baselines alternate --repeats times and the medians are reported. Target: checkpoint write >= 0.5 of the disk's
sequential write rate.

    python -m benchmarks.checkpoint_io --d-model 768 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def drop_from_page_cache(path: Path) -> None:
    """Evict the file's (already synced) pages, so that the next read goes to the disk."""
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_rates(directory: Path, n_bytes: int, block: int = 8 << 20) -> tuple[float, float]:
    """MB/s of a sequential write of n_bytes with fsync at the end, and of reading it back cold."""
    path = directory / "disk_probe.bin"
    payload = os.urandom(block)
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < n_bytes:
            f.write(payload)
            written += block
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    drop_from_page_cache(path)
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(block):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return written / write_s / 1e6, written / read_s / 1e6


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import deepspeed

    from pipeline.checkpoint.save_load import load_checkpoint, save_checkpoint
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.model.gpt import GPT
    from pipeline.train.optimizer import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29588", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = ModelConfig(vocab_size=8192, context_length=256, n_layer=args.layers, n_head=args.d_model // 64,
                      d_model=args.d_model, d_ff=4 * args.d_model)
    train = TrainConfig()
    model = GPT(cfg)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": args.zero}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=lambda _p: build_optimizer(model, train), config=ds_config)
    x = torch.randint(0, 8192, (1, 256))
    _, loss = engine(x, x)
    engine.backward(loss)
    engine.step()  # creates the AdamW moments, so the checkpoint holds the full training state

    root = Path(tempfile.mkdtemp(dir=args.dir))
    runs: dict[str, list[float]] = {"write": [], "read": [], "disk_write": [], "disk_read": []}
    try:
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            tag = save_checkpoint(engine, root / "checkpoints", step, {"step": step, "samples_consumed": step},
                                  keep_last=1)
            os.sync()
            runs["write"].append(time.perf_counter() - start)
            size = dir_bytes(tag)
            drop_from_page_cache(tag)
            start = time.perf_counter()
            load_checkpoint(engine, tag)
            runs["read"].append(time.perf_counter() - start)
            disk_write, disk_read = disk_rates(root, size)
            runs["disk_write"].append(disk_write)
            runs["disk_read"].append(disk_read)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if size < 100e6:
        raise SystemExit(f"the checkpoint holds {size / 1e6:.0f} MB; the benchmark needs >= 100 MB (raise --d-model)")
    write_rate = size / statistics.median(runs["write"]) / 1e6
    read_rate = size / statistics.median(runs["read"]) / 1e6
    disk_write, disk_read = statistics.median(runs["disk_write"]), statistics.median(runs["disk_read"])
    print(json.dumps({
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round(size / 1e6, 1),
        "zero_stage": args.zero,
        "repeats": args.repeats,
        "checkpoint_write_mb_s": round(write_rate, 1),
        "checkpoint_read_cold_mb_s": round(read_rate, 1),
        "disk_sequential_write_mb_s": round(disk_write, 1),
        "disk_sequential_read_cold_mb_s": round(disk_read, 1),
        "write_ratio_vs_disk": round(write_rate / disk_write, 3),
        "read_ratio_vs_disk": round(read_rate / disk_read, 3),
        "target_write_ratio": 0.5,
        "target_met": write_rate / disk_write >= 0.5,
    }, indent=2))


if __name__ == "__main__":
    main()
