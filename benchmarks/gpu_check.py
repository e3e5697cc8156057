"""The GPU check: gpt2_small in bf16 with ZeRO-1 on one GPU over NCCL, through the pipeline's own worker.

Trains a few hundred steps on random tokens (the speed and memory do not depend on the text) and reports
steady tokens/s, MFU against the GPU's datasheet dense bf16 peak (pipeline.train.throughput.GPUS), and the
peak device memory beside what `pipeline plan` predicts for the layout. Without a CUDA device it says so and
exits 0 without measuring anything.

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
    from pipeline.model.size import training_flops_per_token
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.job import TrainJob
    from pipeline.train.plan import plan_memory
    from pipeline.train.throughput import gpu_by_name, mfu
    from pipeline.train.worker import train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["model=gpt2_small", "parallel=gpu", "parallel.num_workers=1", "parallel.zero_stage=1",
                              "parallel.precision=bf16", f"train.max_steps={args.steps}", "train.warmup_steps=10",
                              f"train.micro_batch_size={args.micro_batch}", "train.resume=none",
                              f"train.global_batch_tokens={args.micro_batch * 1024 * 4}", f"output_dir={tmp}"])
        model = cfg.model
        windows = np.random.default_rng(0).integers(0, model.vocab_size, size=(4096, model.context_length + 1))
        data_dir = write_synthetic_dataset(Path(tmp) / "data", windows, vocab_size=model.vocab_size)
        accum = grad_accumulation_steps(cfg.train, cfg.parallel, model.context_length)
        job = TrainJob(model=model, train=cfg.train, parallel=cfg.parallel, data_dir=str(data_dir),
                       run_dir=str(Path(tmp) / "run"), precision="bf16", grad_accum_steps=accum,
                       ds_config=make_ds_config(cfg.train, cfg.parallel, "bf16", accum, d_model=model.d_model),
                       flops_per_token=training_flops_per_token(model), config_fingerprint="gpu_check",
                       math_config={}, tokenizer_sha256="", record_losses=True)
        outcome = train_worker(job)
        props = torch.cuda.get_device_properties(0)
        found = gpu_by_name(props.name, props.total_memory / 2**30)
        peak_memory = torch.cuda.max_memory_allocated()
        planned = plan_memory(model, cfg.parallel, cfg.train, "bf16").total
        report = {
            "device": props.name,
            "steps": args.steps,
            "steady_tokens_per_s": outcome.steady_tokens_per_s,
            "datasheet_bf16_tflops": found[1].bf16_tflops if found else None,
            "mfu_vs_datasheet": mfu(outcome.steady_tokens_per_s, job.flops_per_token, found[1].bf16_tflops)
            if found else None,
            "peak_memory_gib": peak_memory / 2**30,
            "planned_memory_gib": planned / 2**30,
            "planned_over_measured": planned / peak_memory,
            "final_loss": outcome.losses.get(args.steps - 1),
        }
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
