"""Model and optimizer options on the tiny model and Shakespeare's plays: tokens/s and validation loss at a
fixed budget for the default, + document masking, + QK-norm, + Muon (and + z-loss, + grouped-query attention).

Each variant trains the pipeline's DeepSpeed worker (1 worker, fp32) for the same steps on the same prepared
data (one document per scene), then the validation loss is computed over the whole validation split. Each
measurement runs in a fresh process, variants interleaved round by round, and the report takes the median
tokens/s of the repeats (single measurements on a shared 2-core VM swing by 2x); the cost of each option is its
median tokens/s against the default's, measured in the same run. Because those swings exceed the costs being
measured, the report also gives paired step times: one process, the variants interleaved step by step on the
same batch, the median over --paired-rounds (paired_throughput_vs_default).

    python -m benchmarks.model_options --steps 200 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = {
    "default": ({}, {}),
    "document_mask": ({"document_mask": True}, {}),
    "qk_norm": ({"qk_norm": True}, {}),
    "muon": ({}, {"optimizer": "muon"}),
    "z_loss": ({"z_loss": 1e-4}, {}),
    "gqa_2_of_4": ({"n_kv_head": 2}, {}),
}


def prepared_shakespeare(root: Path) -> Path:
    """`pipeline prepare` of the embedded default (a real run of the CLI: Ray, tokenizer training, shards)."""
    from data_prep.prepare import dataset_dir
    from pipeline.compose import compose_config

    subprocess.run([str(Path(sys.executable).with_name("pipeline")), "prepare", f"output_dir={root}"], check=True,
                   capture_output=True)
    return dataset_dir(compose_config([f"output_dir={root}"], stage="prepare").data)


def measure(variant: str, data_dir: Path, steps: int, run_dir: Path) -> dict:
    import torch

    from data_prep.blend import load_data_info, open_split
    from pipeline.checkpoint.layout import checkpoint_root, latest_complete
    from pipeline.compose import compose_config
    from pipeline.config import ParallelConfig
    from pipeline.evaluation.evaluate import load_trained_model, validation_totals
    from pipeline.model.size import model_for_data, training_flops_per_token
    from pipeline.train.driver import measured_attended_context
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec
    from pipeline.train.worker import train_worker

    model_options, train_options = VARIANTS[variant]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29581", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = compose_config([f"output_dir={run_dir}"], stage="train")
    info = load_data_info(data_dir)
    model = dataclasses.replace(cfg.model, **model_options)
    model = model_for_data(model, info.vocab_size, info.eos_id)
    train = dataclasses.replace(cfg.train, max_steps=steps, save_interval_steps=0, log_interval_steps=steps,
                                eval_interval_steps=0, resume="none", **train_options)
    parallel = ParallelConfig(num_workers=1, zero_stage=0, precision="fp32", cpus_per_worker=torch.get_num_threads())
    accum = train.global_batch_tokens // (train.micro_batch_size * model.context_length)
    spec = RunSpec(
        model=model, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir), precision="fp32",
        grad_accum_steps=accum, ds_config=make_ds_config(train, parallel, "fp32", accum, d_model=model.d_model),
        flops_per_token=training_flops_per_token(model, measured_attended_context(model, data_dir)),
        config_fingerprint="bench", math_config={}, tokenizer_sha256="",
    )
    outcome = train_worker(spec)
    from data_prep.text_tokenizer import data_tokenizer

    trained = load_trained_model(model, latest_complete(checkpoint_root(run_dir)))
    totals = validation_totals(trained, open_split(data_dir, "validation"), 16, None, data_tokenizer(info).byte_lengths())
    return {"tokens_per_s": outcome.steady_tokens_per_s, "val_loss": totals.mean_loss}


def paired_step_times(data_dir: Path, variants: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, optimizer) per variant, in one process, the
    variants interleaved step by step on the same real batch of the tiny model: what an option costs in the
    model itself, without the run-to-run swings of the end-to-end measurement."""
    import time

    import torch

    from data_prep.blend import load_data_info, open_split
    from pipeline.compose import compose_config
    from pipeline.model.gpt import GPT
    from pipeline.model.size import model_for_data
    from pipeline.train.optimizer import build_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = compose_config([], stage="train")
    info = load_data_info(data_dir)
    windows = torch.from_numpy(open_split(data_dir, "train").windows(np.arange(cfg.train.micro_batch_size)).astype(np.int64))
    setups = {}
    for variant in variants:
        model_options, train_options = VARIANTS[variant]
        model_cfg = model_for_data(dataclasses.replace(cfg.model, **model_options), info.vocab_size, info.eos_id)
        torch.manual_seed(0)
        model = GPT(model_cfg)
        setups[variant] = (model, build_optimizer(model, dataclasses.replace(cfg.train, **train_options)))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant, (model, optimizer) in setups.items():
            started = time.perf_counter()
            _, loss = model(windows[:, :-1], windows[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[variant].append(time.perf_counter() - started)
    return {v: float(np.median(t[2:])) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--data-dir", help="a prepared Shakespeare data set (default: prepare one)")
    parser.add_argument("--paired-rounds", type=int, default=40)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(measure(args.only, Path(args.data_dir), args.steps, Path(tmp) / "run")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else prepared_shakespeare(Path(tmp) / "out")
        paired = paired_step_times(data_dir, args.variants, args.paired_rounds)
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.model_options", "--only", variant, "--data-dir", str(data_dir),
                     "--steps", str(args.steps)], capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"variant {variant} failed")
                runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("RESULT ")))
    base = float(np.median([r["tokens_per_s"] for r in runs["default"]])) if "default" in runs else None
    table = {}
    for variant, results in runs.items():
        speed = float(np.median([r["tokens_per_s"] for r in results]))
        table[variant] = {
            "tokens_per_s": [round(r["tokens_per_s"], 1) for r in results],
            "tokens_per_s_median": round(speed, 1),
            "throughput_vs_default": round(speed / base, 3) if base else None,
            "val_loss": [round(r["val_loss"], 4) for r in results],
            "paired_step_s": round(paired[variant], 4),
            "paired_throughput_vs_default": round(paired["default"] / paired[variant], 3) if "default" in paired else None,
        }
    print(json.dumps({"steps": args.steps, "model": "tiny (conf/model/tiny.yaml)", "data": "shakespeare",
                      "precision": "fp32", "workers": 1, "variants": table}, indent=2))


if __name__ == "__main__":
    main()
