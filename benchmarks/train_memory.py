"""Memory per training worker as a user gets it: `pipeline train` (Ray, its workers, their start-up) per layout.

Each layout runs `pipeline train model=gpt3_350m model.context_length=128 parallel.zero_stage=Z
parallel.num_workers=W train.max_steps=2 train.micro_batch_size=1 train.global_batch_tokens=256` as its own command
while a sampler reads, every 0.2 s, the resident set of every process the command starts (Ray's workers included)
and the machine's used memory (total less available: Ray's shared-memory object store counts). Reported per layout:
each training worker's peak resident set, the machine's peak above idle, what `pipeline plan` predicts per rank and
the run's own start-up phases (wall time by phase). With --compare the ZeRO-3 layouts run again with
parallel.malloc_mmap_threshold=0 (glibc's dynamic threshold): the memory the setting saves and its speed cost.

Targets (issue 36): the ZeRO-3 worker peak at dp 2 at most 0.6 of dp 1; the plan within 25% of the measured peak
for ZeRO 0, 1 and 3.

    python -m benchmarks.train_memory                  # 6 layouts, about 10 minutes on 2 cores
    python -m benchmarks.train_memory --compare        # and the ZeRO-3 layouts without the threshold
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time

import psutil

LAYOUTS = [(3, 1), (3, 2), (1, 1), (1, 2), (0, 1), (0, 2)]  # (ZeRO stage, workers)
COMMON = ["model=gpt3_350m", "model.context_length=128", "train.max_steps=2", "train.micro_batch_size=1",
          "train.global_batch_tokens=256", "train.warmup_steps=0", "train.eval_interval_steps=0"]


def run_layout(stage: int, workers: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [*COMMON, f"parallel.zero_stage={stage}", f"parallel.num_workers={workers}", f"output_dir={out}", *extra]
        idle = psutil.virtual_memory()
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        peaks: dict[int, int] = {}
        names: dict[int, str] = {}
        used = [0]

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            rss = p.memory_info().rss
                            if rss > peaks.get(p.pid, 0):
                                peaks[p.pid], names[p.pid] = rss, " ".join(p.cmdline())[:80]
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                vm = psutil.virtual_memory()
                used[0] = max(used[0], vm.total - vm.available)
                time.sleep(0.2)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        output, _ = proc.communicate()
        thread.join(2)
        if proc.returncode != 0:
            raise RuntimeError(f"pipeline train {' '.join(args)} exited {proc.returncode}:\n{output[-3000:]}")
        plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", *args], capture_output=True, text=True)
        planned = re.search(r"total\s+([\d.]+) GiB", plan.stdout)
        phases = re.search(r"wall time by phase: (.*)", output)
        ranks = sorted((v for pid, v in peaks.items() if "RayTrainWorker" in names[pid]), reverse=True)[:workers]
        return {"zero_stage": stage, "workers": workers, "extra": extra,
                "wall_s": round(time.perf_counter() - started, 1),
                "worker_peak_gib": [round(r / 2**30, 3) for r in ranks],
                "machine_used_above_idle_gib": round((used[0] - (idle.total - idle.available)) / 2**30, 3),
                "planned_gib": float(planned.group(1)) if planned else None,
                "phases": phases.group(1) if phases else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="the ZeRO-3 layouts again without the threshold")
    parser.add_argument("--layouts", default=",".join(f"{z}:{w}" for z, w in LAYOUTS),
                        help="stage:workers pairs, comma-separated (default: all six)")
    args = parser.parse_args()
    layouts = [tuple(int(x) for x in pair.split(":")) for pair in args.layouts.split(",")]
    results = [run_layout(stage, workers, []) for stage, workers in layouts]
    if args.compare:
        results += [run_layout(3, workers, ["parallel.malloc_mmap_threshold=0"]) for workers in (1, 2)]
    by = {(r["zero_stage"], r["workers"], bool(r["extra"])): max(r["worker_peak_gib"]) for r in results}
    dp2, dp1 = by.get((3, 2, False)), by.get((3, 1, False))
    report = {
        "layouts": results,
        "zero3_dp2_over_dp1": round(dp2 / dp1, 3) if dp1 and dp2 else None,
        "plan_over_measured": {f"zero{r['zero_stage']}_dp{r['workers']}": round(r["planned_gib"] / max(r["worker_peak_gib"]), 3)
                               for r in results if not r["extra"] and r["planned_gib"]},
        "targets": {"zero3_dp2_over_dp1": 0.6, "plan_within": 0.25},
    }
    if args.compare:
        report["zero3_dp2_over_dp1_without_threshold"] = round(by[(3, 2, True)] / by[(3, 1, True)], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
