"""The GPU check: the real path first, then the kernel and MFU measurements, as one JSON report.

1. The real path, as a user runs it: `pipeline run parallel=gpu parallel.num_workers=1 model=gpt2_small` through
   the CLI, Ray and NCCL (prepare Shakespeare, train in bf16 with validation on the worker, evaluate on the GPU
   evaluation worker), then `pipeline export` and a load of the export in transformers on the GPU. Reported from
   the run's own MLflow records: steady tokens/s, MFU against the datasheet peak, rank 0's peak memory beside
   what `pipeline plan` predicts, the validation loss, the start-up phases, where evaluation ran.
2. The same training with train.compile=true (fewer steps): tokens/s against eager and the loss at the same step.
3. The pipeline's worker alone (no Ray, no CLI): gpt2_small in bf16 with ZeRO-1 on random tokens, steady tokens/s,
   MFU and peak memory against the plan.
4. Document-masked attention (forward + backward, bf16, gpt2_small's shapes, documents of ~300 tokens) with
   FlexAttention (compiled; what model.attention_kernel=auto picks on CUDA) and with SDPA and a dense mask.

Without a CUDA device it says so and exits 0 without measuring anything; `--smoke` runs part 1 on the CPU with the
tiny model instead (what the tests of the report's assembly run; no GPU figure comes out of it).

    python -m benchmarks.gpu_check               # about 5-8 minutes on one modern GPU
    python -m benchmarks.gpu_check --steps 100   # quicker
    python -m benchmarks.gpu_check --smoke       # the real path's plumbing on this CPU (tiny model), 2-3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
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


def pipeline_cli(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`pipeline <args>` as a user runs it (a new process), its output kept; an error names the command."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"pipeline {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def run_record(output_dir: Path, run_name: str) -> dict:
    """The MLflow run's metric histories and tags, read through MLflow's client from the run's own store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == run_name]
    if not runs:
        raise RuntimeError(f"no MLflow run named {run_name} in {output_dir / 'mlflow.db'}")
    run = runs[0]
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    return {"metrics": history, "tags": run.data.tags}


def steady(history: list[tuple[int, float]]) -> float | None:
    """The median of the second half of a logged metric (the first logs hold start-up)."""
    values = [v for _, v in sorted(history)]
    return float(np.median(values[len(values) // 2:])) if values else None


def real_path(tmp: Path, overrides: list[str], run_name: str, compile_: bool, export: bool, timeout_s: float) -> dict:
    """Part 1 (or 2 with compile_): the CLI's `run` (then `export`), reported from the run's records."""
    import torch

    from data_prep.blend import load_data_info
    from pipeline.compose import compose_config
    from pipeline.model.size import model_for_data
    from pipeline.train.memory_plan import plan_memory

    args = [*overrides, f"run_name={run_name}", f"train.compile={str(compile_).lower()}", f"output_dir={tmp}"]
    started = time.perf_counter()
    done = pipeline_cli(["run" if not compile_ else "train", *args], timeout_s)
    wall = time.perf_counter() - started
    record = run_record(tmp, run_name)
    metrics, tags = record["metrics"], record["tags"]
    cfg = compose_config(args, stage="train")
    data_dir = next(p for p in (tmp / "data").iterdir() if (p / "manifest.json").is_file() or (p / "blend.json").is_file())
    model = model_for_data(cfg.model, load_data_info(data_dir).vocab_size)
    planned = plan_memory(model, cfg.parallel, cfg.train, "bf16" if cfg.parallel.precision != "fp32" else "fp32").total
    measured = max((v for _, v in metrics.get("memory_mb", [])), default=None)
    out = {
        "command": "pipeline " + ("run " if not compile_ else "train ") + " ".join(args),
        "wall_s": round(wall, 1),
        "steady_tokens_per_s": steady(metrics.get("tokens_per_s", [])),
        "mfu_vs_datasheet": steady(metrics.get("mfu", [])),
        "mfu_peak": tags.get("mfu_peak"),
        "peak_memory_gib": measured / 1024 if measured else None,
        "planned_memory_gib": planned / 2**30,
        "planned_over_measured": planned / (measured * 2**20) if measured else None,
        "train_loss": dict(sorted(metrics.get("train_loss", []))),
        "val_loss": dict(sorted(metrics.get("val_loss", []))),
        "startup_s": {k.removeprefix("startup/"): float(v) for k, v in tags.items() if k.startswith("startup/")},
        "evaluation_worker": tags.get("evaluation_worker"),
        "stdout_tail": done.stdout.strip().splitlines()[-3:],
    }
    if export:
        hf_dir = tmp / "hf"
        pipeline_cli(["export", *args, f"eval.export_dir={hf_dir}"], timeout_s)
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = AutoModelForCausalLM.from_pretrained(hf_dir).to(device).eval()
        out["export"] = {"dir": str(hf_dir), "class": type(loaded).__name__,
                         "parameters": sum(p.numel() for p in loaded.parameters()), "loaded_on": device}
    return out


def real_path_checks(steps: int, smoke: bool, timeout_s: float) -> dict:
    """Parts 1 and 2 (part 2 on a GPU only)."""
    if smoke:
        overrides = ["model=tiny", "parallel=cpu", f"train.max_steps={steps}", "train.warmup_steps=2",
                     "train.eval_interval_steps=0", "train.log_interval_steps=2", "eval.num_samples=1"]
    else:
        overrides = ["model=gpt2_small", "parallel=gpu", "parallel.num_workers=1", "parallel.precision=bf16",
                     f"train.max_steps={steps}", "train.warmup_steps=20", "train.micro_batch_size=16",
                     f"train.global_batch_tokens={16 * 1024 * 2}", "train.eval_interval_steps=100",
                     "train.log_interval_steps=10", "eval.max_tokens=262144"]
    with tempfile.TemporaryDirectory() as tmp:
        report = {"real_path": real_path(Path(tmp), overrides, "gpu-check", False, True, timeout_s)}
        if not smoke:
            short = [o if not o.startswith("train.max_steps=") else f"train.max_steps={max(40, steps // 2)}"
                     for o in overrides]
            compiled = real_path(Path(tmp), short, "gpu-check-compile", True, False, timeout_s)
            eager = report["real_path"]
            step = max(compiled["train_loss"])
            report["compile"] = {
                **{k: compiled[k] for k in ("wall_s", "steady_tokens_per_s", "mfu_vs_datasheet", "peak_memory_gib")},
                "speedup_over_eager": (compiled["steady_tokens_per_s"] / eager["steady_tokens_per_s"]
                                       if compiled["steady_tokens_per_s"] and eager["steady_tokens_per_s"] else None),
                "loss_at_step": step, "loss_compiled": compiled["train_loss"][step],
                "loss_eager": eager["train_loss"].get(step),
            }
    return report


def worker_check(steps: int, micro_batch: int) -> dict:
    """Part 3: the pipeline's worker alone on random tokens."""
    import torch

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
                              "parallel.precision=bf16", f"train.max_steps={steps}", "train.warmup_steps=10",
                              f"train.micro_batch_size={micro_batch}", "train.resume=none", "train.eval_interval_steps=0",
                              f"train.global_batch_tokens={micro_batch * 1024 * 4}", f"output_dir={tmp}"])
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
        return {
            "device": props.name,
            "steps": steps,
            "steady_tokens_per_s": outcome.steady_tokens_per_s,
            "datasheet_bf16_tflops": found[1].bf16_tflops if found else None,
            "mfu_vs_datasheet": mfu(outcome.steady_tokens_per_s, spec.flops_per_token, found[1].bf16_tflops)
            if found else None,
            "peak_memory_gib": peak_memory / 2**30,
            "planned_memory_gib": planned / 2**30,
            "planned_over_measured": planned / peak_memory,
            "final_loss": outcome.losses.get(steps - 1),
        }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps of the real path (part 1)")
    parser.add_argument("--worker-steps", type=int, default=150, help="steps of the worker alone (part 3)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="part 1 on the CPU with the tiny model (no GPU figures)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds each pipeline command may take")
    args = parser.parse_args(argv)
    if args.smoke:
        print(json.dumps(real_path_checks(min(args.steps, 20), True, args.timeout), indent=1))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device is visible on this machine (torch.cuda.is_available() is False); "
              "run it on a GPU machine.")
        return 0
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(0), **real_path_checks(args.steps, False, args.timeout)}
    report["worker_alone"] = worker_check(args.worker_steps, args.micro_batch)
    report["document_mask_attention"] = attention_kernels()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
