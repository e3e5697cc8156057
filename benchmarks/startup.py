"""Start-up overhead of `pipeline train`: the wall time of a short run less its steps at the steady rate.

Prepares the default data set once, then runs `pipeline train` (real Ray, Ray Train, DeepSpeed, MLflow) a few
times with few steps, each a fresh process as a user would, and reads back the phases the driver logged to
MLflow (tags startup/<phase>_s, see pipeline.train.startup). Target: overhead_wall_s (the process's wall time, its
exit included, less the steps at the steady rate) below 40 s on 2 cores; the first
run also pays what a fresh machine pays once (e.g. compiled caches), so the report gives each run.

    python -m benchmarks.startup --runs 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_OVERHEAD_S = 40.0


def run_train(out: Path, name: str, steps: int) -> tuple[float, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    started = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"output_dir={out}", f"run_name={name}",
                    f"train.max_steps={steps}", "train.warmup_steps=2"], check=True, capture_output=True, text=True)
    wall = time.time() - started
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("pipeline").experiment_id,
                             filter_string=f"tags.mlflow.runName = '{name}'")[0]
    phases = {k.removeprefix("startup/"): round(float(v), 2) for k, v in run.data.tags.items() if k.startswith("startup/")}
    return wall, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="at least 2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", f"output_dir={out}"], check=True,
                       capture_output=True, text=True)
        runs = []
        for i in range(args.runs):
            wall, phases = run_train(out, f"startup-{i}", args.steps)
            steady_steps_s = phases["steps_s"] * args.steps / (args.steps - 1)
            # Seen from outside: the process's whole wall time (its exit and Ray's shutdown included) less the
            # steps at the steady rate.
            runs.append({"wall_s": round(wall, 2), **phases, "overhead_wall_s": round(wall - steady_steps_s, 2)})
    best = min(r["overhead_wall_s"] for r in runs)
    print(json.dumps({"steps": args.steps, "runs": runs, "best_overhead_s": best,
                      "target_overhead_s": TARGET_OVERHEAD_S, "target_met": best < TARGET_OVERHEAD_S}, indent=2))


if __name__ == "__main__":
    main()
