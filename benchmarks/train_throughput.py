"""Training throughput: the pipeline's DeepSpeed worker (1 worker) beside a bare PyTorch loop, same run.

Both train the same model on the same random token windows with AdamW for the same number of steps;
the report gives tokens/s of each, their ratio (target >= 0.9) and the pipeline's MFU against the
matmul peaks (bf16 and fp32) of this machine measured in the same run. Each measurement runs in a fresh
process, bare and pipeline alternating, and the report takes the median of the repeats: on a shared
2-core VM single measurements swing by 2x.

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
from pipeline.model.size import training_flops_per_token


def synthetic_dataset(root: Path, vocab: int, window: int, n_windows: int) -> Path:
    from data_prep.shards import write_synthetic_dataset

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n_windows, window), dtype=np.int64)
    return write_synthetic_dataset(root, tokens, vocab_size=vocab)


def bare_loop(model_cfg: ModelConfig, train: TrainConfig, windows: np.ndarray, precision: str) -> float:
    from pipeline.model.gpt import GPT
    from pipeline.train.optimizer import build_optimizer

    torch.manual_seed(train.seed)
    model = GPT(model_cfg)
    opt = build_optimizer(model, train)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    b = train.micro_batch_size
    tokens = 0
    start = None
    for step in range(train.max_steps):
        if step == 2:  # skip two warm-up steps, as the pipeline's steady_tokens_per_s does
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
    from pipeline.model.size import training_flops_per_token
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec
    from pipeline.train.worker import train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29577", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    # The same CPU threads as the bare loop (a training worker otherwise uses parallel.cpus_per_worker).
    parallel = ParallelConfig(num_workers=1, zero_stage=0, precision=precision, cpus_per_worker=torch.get_num_threads())
    spec = RunSpec(
        model=model_cfg, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
        precision=precision, grad_accum_steps=1, ds_config=make_ds_config(train, parallel, precision, 1),
        flops_per_token=training_flops_per_token(model_cfg), config_fingerprint="bench", math_config={}, tokenizer_sha256="",
    )
    return train_worker(spec).steady_tokens_per_s


def measure(kind: str, args) -> float:
    """One measurement in this (fresh) process: bare | pipeline tokens/s, or peak TFLOP/s."""
    torch.set_num_threads(os.cpu_count() or 1)
    model_cfg = ModelConfig(vocab_size=8192, context_length=args.context, n_layer=args.layers,
                            n_head=args.d_model // 64, d_model=args.d_model, d_ff=4 * args.d_model)
    train = TrainConfig(max_steps=args.steps, micro_batch_size=args.batch, warmup_steps=1,
                        global_batch_tokens=args.batch * args.context, log_interval_steps=args.steps)
    windows = np.random.default_rng(0).integers(0, 8192, size=(args.batch * args.steps, args.context + 1))
    if kind.startswith("peak"):
        from pipeline.train.throughput import measure_peak_tflops

        precision = "bf16" if kind == "peak_bf16" else args.precision
        return measure_peak_tflops(precision, torch.device("cpu"), size=2048, trials=10)
    if kind == "bare":
        return bare_loop(model_cfg, train, windows, args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = synthetic_dataset(Path(tmp) / "data", 8192, args.context + 1, len(windows))
        return pipeline_worker(model_cfg, train, data_dir, Path(tmp) / "run", args.precision)


def main() -> None:
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["bare", "pipeline", "peak", "peak_bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(f"RESULT {measure(args.only, args)}")
        return
    # Each measurement in a fresh process, alternating, so that neither inherits the other's threads or memory.
    results: dict[str, list[float]] = {"bare": [], "pipeline": [], "peak": [], "peak_bf16": []}
    for kind in ["bare", "pipeline"] * args.repeats + ["peak", "peak_bf16"]:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", *sys.argv[1:], "--only", kind],
                              capture_output=True, text=True, check=True)
        results[kind].append(float(proc.stdout.strip().splitlines()[-1].split()[-1]))
    bare, ours = float(np.median(results["bare"])), float(np.median(results["pipeline"]))
    peak, peak_bf16 = results["peak"][0], results["peak_bf16"][0]
    flops = training_flops_per_token(ModelConfig(vocab_size=8192, context_length=args.context, n_layer=args.layers,
                                                 n_head=args.d_model // 64, d_model=args.d_model, d_ff=4 * args.d_model))
    print(json.dumps({
        "precision": args.precision,
        "model": {"d_model": args.d_model, "n_layer": args.layers, "context": args.context, "batch": args.batch},
        "bare_pytorch_tokens_per_s": [round(x, 1) for x in results["bare"]],
        "pipeline_tokens_per_s": [round(x, 1) for x in results["pipeline"]],
        "ratio_pipeline_over_bare_median": round(ours / bare, 3),
        "target_ratio": 0.9,
        "target_met": ours / bare >= 0.9,
        f"measured_{args.precision}_peak_tflops": round(peak, 4),
        "measured_bf16_peak_tflops": round(peak_bf16, 4),
        f"pipeline_mfu_vs_{args.precision}_peak": round(ours * flops / (peak * 1e12), 4),
        "pipeline_mfu_vs_bf16_peak": round(ours * flops / (peak_bf16 * 1e12), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
