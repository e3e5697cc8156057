"""The GPU check: gpt2_small in bf16 with ZeRO-1 on one GPU over NCCL, through the pipeline's own worker.

Trains a few hundred steps on random tokens (the speed and memory do not depend on the text) and reports
steady tokens/s, MFU against the GPU's datasheet dense bf16 peak (pipeline.train.throughput.GPUS), and the
peak device memory beside what `pipeline plan` predicts for the layout. Then times document-masked attention
(forward + backward, bf16, gpt2_small's shapes, documents of ~300 tokens) with FlexAttention (compiled; what
model.attention_kernel=auto picks on CUDA) and with SDPA and a dense block-diagonal mask, and checks that they
agree. Without a CUDA device it says so and exits 0 without measuring anything.

    python -m benchmarks.gpu_check               # about 2-5 minutes on one modern GPU
    python -m benchmarks.gpu_check --steps 50    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attention_kernels(batch: int = 8, heads: int = 12, length: int = 1024, head_dim: int = 64,
                      rounds: int = 20) -> dict:
    """Milliseconds per forward + backward of document-masked attention: FlexAttention (compiled) vs SDPA with a
    dense mask, and their largest difference."""
    import time

    import torch
    import torch.nn.functional as F

    from pipeline.model.gpt import allowed_keys, document_block_mask, document_segments, flex_attention

    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (batch, length), device="cuda")
    ids[torch.rand(batch, length, device="cuda") < 1 / 300] = 2
    starts = document_segments(ids, 2, 0, None)
    dense = allowed_keys(torch.arange(length, device="cuda"), length, starts)[:, None]
    block = document_block_mask(starts)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    kernels = {"flex": lambda: flex_attention(q, k, v, block),
               "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)}
    times = {}
    for name, run in kernels.items():
        for i in range(rounds + 3):
            if i == 3:
                torch.cuda.synchronize()
                started = time.perf_counter()
            run().sum().backward()
        torch.cuda.synchronize()
        times[f"{name}_ms"] = (time.perf_counter() - started) / rounds * 1e3
    with torch.no_grad():
        difference = (kernels["flex"]().float() - kernels["sdpa_mask"]().float()).abs().max().item()
    return {**times, "max_abs_difference": difference, "shape": [batch, heads, length, head_dim]}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device is visible on this machine (torch.cuda.is_available() is False); "
              "run it on a GPU machine.")
        return 0

    from data_prep.shards import write_synthetic_dataset
    from pipeline.compose import compose_config
    from pipeline.config import grad_accumulation_steps
    from pipeline.model.size import model_for_data, training_flops_per_token
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.memory_plan import plan_memory
    from pipeline.train.run_spec import RunSpec
    from pipeline.train.throughput import gpu_by_name, mfu
    from pipeline.train.worker import train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["model=gpt2_small", "parallel=gpu", "parallel.num_workers=1", "parallel.zero_stage=1",
                              "parallel.precision=bf16", f"train.max_steps={args.steps}", "train.warmup_steps=10",
                              f"train.micro_batch_size={args.micro_batch}", "train.resume=none", "train.eval_interval_steps=0",
                              f"train.global_batch_tokens={args.micro_batch * 1024 * 4}", f"output_dir={tmp}"])
        model = model_for_data(cfg.model, cfg.model.vocab_size, 2)  # write_synthetic_dataset's EOS id
        windows = np.random.default_rng(0).integers(0, model.vocab_size, size=(4096, model.context_length + 1))
        data_dir = write_synthetic_dataset(Path(tmp) / "data", windows, vocab_size=model.vocab_size)
        accum = grad_accumulation_steps(cfg.train, cfg.parallel, model.context_length)
        spec = RunSpec(model=model, train=cfg.train, parallel=cfg.parallel, data_dir=str(data_dir),
                       run_dir=str(Path(tmp) / "run"), precision="bf16", grad_accum_steps=accum,
                       ds_config=make_ds_config(cfg.train, cfg.parallel, "bf16", accum, d_model=model.d_model),
                       flops_per_token=training_flops_per_token(model), config_fingerprint="gpu_check",
                       math_config={}, tokenizer_sha256="", record_losses=True)
        outcome = train_worker(spec)
        props = torch.cuda.get_device_properties(0)
        found = gpu_by_name(props.name, props.total_memory / 2**30)
        peak_memory = torch.cuda.max_memory_allocated()
        planned = plan_memory(model, cfg.parallel, cfg.train, "bf16").total
        report = {
            "device": props.name,
            "steps": args.steps,
            "steady_tokens_per_s": outcome.steady_tokens_per_s,
            "datasheet_bf16_tflops": found[1].bf16_tflops if found else None,
            "mfu_vs_datasheet": mfu(outcome.steady_tokens_per_s, spec.flops_per_token, found[1].bf16_tflops)
            if found else None,
            "peak_memory_gib": peak_memory / 2**30,
            "planned_memory_gib": planned / 2**30,
            "planned_over_measured": planned / peak_memory,
            "final_loss": outcome.losses.get(args.steps - 1),
            "document_mask_attention": attention_kernels(),
        }
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
