"""Training throughput: the pipeline's DeepSpeed worker (1 worker) beside a bare PyTorch loop, same run.

Both train the same model on the same random token windows with AdamW for the same number of steps;
the report gives tokens/s of each, their ratio (target >= 0.9) and the pipeline's MFU against the
matmul peak of this machine measured in the same run.

    python -m benchmarks.train_throughput --steps 30 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig, ParallelConfig, TrainConfig


def synthetic_dataset(root: Path, vocab: int, window: int, n_windows: int) -> Path:
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n_windows, window), dtype=np.int64)
    return write_synthetic_dataset(root, tokens, vocab_size=vocab)


def bare_loop(model_cfg: ModelConfig, train: TrainConfig, windows: np.ndarray, precision: str) -> float:
    from pipeline.model import GPT
    from pipeline.optimizer import build_optimizer

    torch.manual_seed(train.seed)
    model = GPT(model_cfg)
    opt = build_optimizer(model, train)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    b = train.micro_batch_size
    tokens = 0
    start = None
    for step in range(train.max_steps):
        if step == 2:  # skip warm-up steps, as the pipeline's window does
            start, tokens = time.perf_counter(), 0
        batch = torch.from_numpy(windows[(step * b) % len(windows):][:b])
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch[:, :-1].numel()
    return tokens / (time.perf_counter() - start)


def pipeline_worker(model_cfg: ModelConfig, train: TrainConfig, data_dir: Path, run_dir: Path, precision: str) -> float:
    from pipeline.ds_config import make_ds_config
    from pipeline.model_size import training_flops_per_token
    from pipeline.train_loop import TrainJob, train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29577", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    parallel = ParallelConfig(num_workers=1, zero_stage=0, precision=precision)
    job = TrainJob(
        model=model_cfg, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
        precision=precision, grad_accum_steps=1, ds_config=make_ds_config(train, parallel, precision, 1),
        flops_per_token=training_flops_per_token(model_cfg), config_fingerprint="bench", math_config={}, tokenizer_sha256="",
    )
    return train_worker(job).tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    model_cfg = ModelConfig(vocab_size=8192, context_length=args.context, n_layer=args.layers,
                            n_head=args.d_model // 64, d_model=args.d_model, d_ff=4 * args.d_model)
    train = TrainConfig(max_steps=args.steps, micro_batch_size=args.batch, warmup_steps=1,
                        global_batch_tokens=args.batch * args.context, log_interval_steps=args.steps - 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        windows = np.random.default_rng(0).integers(0, 8192, size=(args.batch * args.steps, args.context + 1))
        data_dir = synthetic_dataset(root / "data", 8192, args.context + 1, len(windows))
        from pipeline.model_size import training_flops_per_token
        from pipeline.throughput import measure_peak_tflops

        peak = measure_peak_tflops(args.precision, torch.device("cpu"), size=2048, trials=10)
        bare = bare_loop(model_cfg, train, windows, args.precision)
        ours = pipeline_worker(model_cfg, train, data_dir, root / "run", args.precision)
    flops = training_flops_per_token(model_cfg)
    report = {
        "precision": args.precision,
        "model": {"d_model": args.d_model, "n_layer": args.layers, "context": args.context, "batch": args.batch},
        "bare_pytorch_tokens_per_s": round(bare, 1),
        "pipeline_tokens_per_s": round(ours, 1),
        "ratio_pipeline_over_bare": round(ours / bare, 3),
        "measured_peak_tflops": round(peak, 4),
        "pipeline_mfu": round(ours * flops / (peak * 1e12), 4),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
