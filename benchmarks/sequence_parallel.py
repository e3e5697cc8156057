"""Memory per rank of a long-context window under Ulysses sequence parallelism (parallel.sequence_parallel).

A tiny-width GPT (d_model 128, 4 layers, 4 heads, vocabulary 8192, document masking on as in the tiny model) trains
a few steps at context 16384 on 2 ranks, once as sp 1 (two data-parallel ranks, each a whole window) and once as
sp 2 (one window, each rank half of it): every rank is a fresh process (gloo) running the pipeline's own
build_engine (Ulysses' groups, DistributedAttention) and train_step, its resident set sampled every 20 ms from the
start (benchmarks.zero_memory), and the machine's used memory sampled beside them. The default settings otherwise
(bf16 on this CPU, ZeRO-1, learned positions).

Reported per layout: each rank's peak resident set, its growth from just before the model is built (the analogue of
a GPU's memory: what the training itself allocates), and the machine's peak used memory over the run's baseline
(both ranks' processes, imports included).

Target (issue: long context): the per-rank growth at sp 2 is at most 0.6 of sp 1. Document masking on CPU
attends a block of queries at a time (pipeline.model.gpt.QUERY_BLOCK): torch's SDPA would otherwise keep a float
mask of the whole window per layer on every rank of the group (1 GiB per layer at 16k, measured), which sequence
parallelism does not divide.

    python -m benchmarks.sequence_parallel                  # about 3 minutes on 2 cores
    python -m benchmarks.sequence_parallel --context 8192 --no-document-mask
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.zero_memory import measure
from pipeline.config import ModelConfig, ParallelConfig, TrainConfig

VOCAB, EOS = 8192, 0
WORKERS = 2


class MachineSampler:
    """The machine's peak used memory (psutil: total - available, which counts Ray's and torch's shared memory)
    above what it used when the sampler started."""

    def __init__(self, interval_s: float = 0.02):
        self.baseline = self._used()
        self.peak, self.interval_s = self.baseline, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int:
        memory = psutil.virtual_memory()
        return memory.total - memory.available

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def spec_for(model: ModelConfig, sp: int, data_dir: Path, run_dir: Path, steps: int, precision: str):
    from pipeline.config import data_parallel_size
    from pipeline.train.ds_config import make_ds_config
    from pipeline.train.run_spec import RunSpec

    parallel = ParallelConfig(num_workers=WORKERS, sequence_parallel=sp, zero_stage=1, precision=precision)
    train = TrainConfig(max_steps=steps, micro_batch_size=1, warmup_steps=0, resume="none", peak_tflops=1.0,
                        global_batch_tokens=data_parallel_size(parallel) * model.context_length)
    return RunSpec(model=model, train=train, parallel=parallel, data_dir=str(data_dir), run_dir=str(run_dir),
                   precision=precision, grad_accum_steps=1,
                   ds_config=make_ds_config(train, parallel, precision, 1, d_model=model.d_model),
                   flops_per_token=1.0, config_fingerprint="bench", math_config={}, tokenizer_sha256="")


def main(argv: list[str] | None = None) -> int:
    from data_prep.shards import write_synthetic_dataset
    from pipeline.train.memory_plan import plan_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-document-mask", dest="document_mask", action="store_false",
                        help="plain causal attention (default: within documents, 1 in 2048 tokens an EOS)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    model = ModelConfig(vocab_size=VOCAB, context_length=args.context, n_layer=4, n_head=4, d_model=128, d_ff=512,
                        dropout=0.0, document_mask=args.document_mask, eos_id=EOS)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # as benchmarks.zero_memory: freed blocks go back
    gib = 2**30
    report = {"context": args.context, "precision": args.precision, "document_mask": args.document_mask,
              "ranks": WORKERS, "layouts": []}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        windows = rng.integers(1, VOCAB, size=(8, args.context + 1))
        windows[rng.random(windows.shape) < 1 / 2048] = EOS
        data_dir = write_synthetic_dataset(Path(tmp) / "data", windows, vocab_size=VOCAB)
        for sp in (1, 2):
            spec = spec_for(model, sp, data_dir, Path(tmp) / f"sp{sp}", args.steps, args.precision)
            machine = MachineSampler()
            ranks = measure(spec, WORKERS)
            machine_grown = machine.stop()
            row = {"sequence_parallel": sp, "data_parallel": WORKERS // sp,
                   "peak_rss_gib": max(r["peak_rss"] for r in ranks) / gib,
                   "grown_gib": max(r["peak_rss"] - r["before_model_rss"] for r in ranks) / gib,
                   "machine_grown_gib": machine_grown / gib,
                   "planned_gib": plan_memory(model, spec.parallel, spec.train, args.precision).total / gib,
                   "seconds_per_step": max(r["steps_s"] for r in ranks) / args.steps}
            report["layouts"].append(row)
            print(json.dumps(row), flush=True)
    one, two = report["layouts"]
    report["sp2_over_sp1_grown"] = two["grown_gib"] / one["grown_gib"]
    report["sp2_over_sp1_peak_rss"] = two["peak_rss_gib"] / one["peak_rss_gib"]
    report["sp2_over_sp1_machine"] = two["machine_grown_gib"] / one["machine_grown_gib"]
    report["target"] = {"sp2_over_sp1_grown": "<= 0.6"}
    print(json.dumps(report, indent=1))
    ok = report["sp2_over_sp1_grown"] <= 0.6
    print("target met" if ok else "target NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
