"""Checkpoint write and read throughput (MB/s) beside the disk's sequential write rate, in one run.

A DeepSpeed engine (1 rank, gloo, ZeRO stage from --zero) holds a GPT with >= 100 MB of state (weights plus
AdamW moments); its sharded checkpoint is saved through pipeline.checkpointing (which marks it complete)
and flushed to disk, then loaded back. The disk baseline writes the same number of bytes sequentially with
fsync. Target: checkpoint write >= 0.5 of the disk rate.

    python -m benchmarks.checkpoint_io --d-model 768 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def disk_write_rate(directory: Path, n_bytes: int, block: int = 8 << 20) -> float:
    """MB/s of a sequential write of n_bytes with fsync at the end."""
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
    elapsed = time.perf_counter() - start
    path.unlink()
    return written / elapsed / 1e6


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import deepspeed

    from pipeline.checkpointing import load_checkpoint, save_checkpoint
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.model import GPT
    from pipeline.optimizer import build_optimizer

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
    try:
        start = time.perf_counter()
        tag = save_checkpoint(engine, root / "checkpoints", 1, {"step": 1, "samples_consumed": 1}, keep_last=1)
        os.sync()
        write_s = time.perf_counter() - start
        size = dir_bytes(tag)
        start = time.perf_counter()
        load_checkpoint(engine, tag)
        read_s = time.perf_counter() - start
        disk = disk_write_rate(root, size)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_rate, read_rate = size / write_s / 1e6, size / read_s / 1e6
    print(json.dumps({
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round(size / 1e6, 1),
        "zero_stage": args.zero,
        "checkpoint_write_mb_s": round(write_rate, 1),
        "checkpoint_read_mb_s": round(read_rate, 1),
        "disk_sequential_write_mb_s": round(disk, 1),
        "write_ratio_vs_disk": round(write_rate / disk, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
