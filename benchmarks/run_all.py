"""Run every benchmark in turn, each in its own process, and print their JSON reports (`make bench`).

    python -m benchmarks.run_all                 # all
    python -m benchmarks.run_all train_throughput checkpoint_io
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = [
    "train_throughput", "checkpoint_io", "generation_kv_cache", "data_prep_throughput", "zero_memory", "startup",
    "model_options", "eval_throughput", "gpu_check", "checkpoint_uploads", "async_checkpoint", "sequence_parallel",
    "scaling_fit",
]


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose among {BENCHMARKS}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"== benchmarks.{name}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        print(f"== benchmarks.{name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
