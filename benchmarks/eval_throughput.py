"""Validation throughput on the training workers: tokens/s of the sharded validation (pipeline.data.validation)
on 1 and 2 workers, beside the training tokens/s of the same model and run.

Each layout trains the tiny model for a few steps on the prepared Shakespeare data through the pipeline's own
worker (real DeepSpeed over gloo, one process per rank, fp32) and scores the whole validation split at the end;
the report gives validation and training tokens/s per layout and the 2-worker speed-up of each. On this 2-core
machine 2 workers share the same 2 cores, so the speed-up measures the overhead more than a gain.

    python -m benchmarks.eval_throughput --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, data_dir: str, run_dir: str, steps: int, out: str) -> None:
    import dataclasses

    import torch

    from data_prep.blend import load_data_info
    from pipeline.compose import compose_config
    from pipeline.config import ParallelConfig
    from pipeline.model.size import model_for_data
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec
    from pipeline.train.worker import train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cfg = compose_config([], stage="train")
    info = load_data_info(Path(data_dir))
    model = model_for_data(cfg.model, info.vocab_size, info.eos_id)
    train = dataclasses.replace(cfg.train, max_steps=steps, warmup_steps=1, eval_interval_steps=steps, resume="none",
                                log_interval_steps=steps)
    cpus = max(1, (os.cpu_count() or 1) // world)
    parallel = ParallelConfig(num_workers=world, zero_stage=1 if world > 1 else 0, precision="fp32",
                              cpus_per_worker=cpus)
    accum = train.global_batch_tokens // (train.micro_batch_size * world * model.context_length)
    spec = RunSpec(model=model, train=train, parallel=parallel, data_dir=data_dir, run_dir=run_dir, precision="fp32",
                   grad_accum_steps=accum, ds_config=make_ds_config(train, parallel, "fp32", accum, d_model=model.d_model),
                   flops_per_token=1.0, config_fingerprint="bench", math_config={}, tokenizer_sha256="")
    torch.set_num_threads(cpus)
    outcome = train_worker(spec)
    if rank == 0:
        Path(out).write_text(json.dumps({"val_tokens_per_s": outcome.val_tokens_per_s,
                                         "train_tokens_per_s": outcome.steady_tokens_per_s,
                                         "val_loss": outcome.val_losses.get(steps)}))


def measure(world: int, data_dir: Path, steps: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    out = tmp / f"result-{world}.json"
    mp.start_processes(rank_main, args=(world, free_port(), str(data_dir), str(tmp / f"run-{world}"), steps, str(out)),
                       nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data-dir", help="a prepared Shakespeare data set (default: prepare one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data_dir:
            data_dir = Path(args.data_dir)
        else:
            from data_prep.prepare import dataset_dir
            from pipeline.compose import compose_config

            subprocess.run([str(Path(sys.executable).with_name("pipeline")), "prepare", f"output_dir={tmp / 'out'}"],
                           check=True, capture_output=True)
            data_dir = dataset_dir(compose_config([f"output_dir={tmp / 'out'}"], stage="prepare").data)
        results = {f"{w}_workers": measure(w, data_dir, args.steps, tmp) for w in (1, 2)}
    one, two = results["1_workers"], results["2_workers"]
    print(json.dumps({
        "model": "tiny", "data": "shakespeare validation split", "precision": "fp32", "steps": args.steps, **results,
        "val_speedup_2_over_1": round(two["val_tokens_per_s"] / one["val_tokens_per_s"], 3),
        "train_speedup_2_over_1": round(two["train_tokens_per_s"] / one["train_tokens_per_s"], 3),
        "val_loss_equal_1_vs_2": abs(one["val_loss"] - two["val_loss"]) <= 1e-5 * abs(one["val_loss"]),
    }, indent=2))


if __name__ == "__main__":
    main()
