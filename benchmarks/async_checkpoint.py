"""What a checkpoint costs training, asynchronous (train.async_checkpoint=true) against synchronous, through
`pipeline train` (its Ray workers, the default settings but the model size), in one run.

A model of about 307 M parameters (d_model 1024, 24 layers, d_ff 4096; ZeRO-1, bf16, one rank by default: two
ranks of it with the asynchronous copy exceed the 24 GiB of the development VM, where Ray's memory monitor kills a
worker at 95%; one window of 128 tokens a step, as the stall does not depend on the batch) trains the same steps
twice, each a fresh process as a user's, with a checkpoint every --save-every steps. Each periodic
save logs the seconds it stalled training (MLflow `checkpoint_stall_s`: synchronous, the whole write;
asynchronous, the copy of the state in memory: the first into fresh memory, the later ones into the buffers kept
from it), and an asynchronous one also the seconds of its commit at a
later step boundary (`checkpoint_commit_s`: waiting for the slowest rank's writer, the marker). The stall of an
asynchronous checkpoint is the sum of the two; the medians are compared. Target: at most 0.2 of the
synchronous stall. The wall time of each run is printed too: the writer threads share the CPUs with training.

    python -m benchmarks.async_checkpoint --steps 9 --save-every 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.checkpoint_uploads import metric_histories

TARGET_RATIO = 0.2


def train(out: Path, name: str, args, extra: list[str]) -> tuple[float, dict[str, dict[int, float]]]:
    """Wall seconds of one `pipeline train`, and its checkpoint_stall_s and checkpoint_commit_s by step."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"output_dir={out}", f"run_name={name}",
                           f"model.d_model={args.d_model}", f"model.n_layer={args.layers}",
                           f"model.d_ff={4 * args.d_model}", f"train.max_steps={args.steps}",
                           f"train.save_interval_steps={args.save_every}", "train.eval_interval_steps=0",
                           "train.keep_last_checkpoints=2", "train.warmup_steps=1",
                           f"parallel.num_workers={args.workers}", "train.micro_batch_size=1",
                           f"train.global_batch_tokens={128 * args.workers}", *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline train ({name}) failed:\n{proc.stderr[-4000:]}")
    wall = time.time() - started
    return wall, metric_histories(out, name, ["checkpoint_stall_s", "checkpoint_commit_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", f"output_dir={out}"], check=True,
                       capture_output=True, text=True)
        report: dict[str, dict] = {}
        for mode, extra in (("synchronous", []), ("asynchronous", ["train.async_checkpoint=true"])):
            wall, metrics = train(out, f"ckpt-{mode}", args, extra)
            saves, commits = metrics["checkpoint_stall_s"], metrics["checkpoint_commit_s"]
            # Each asynchronous checkpoint's commit is logged at the first step boundary after its writes ended
            # (or inside the next save, whose stall then includes it).
            order = sorted(commits)
            stalls = []
            for step in sorted(saves):
                later = [s for s in order if s > step and not any(step < t < s for t in saves)]
                stalls.append(saves[step] + (commits[later[0]] if later else 0.0))
            report[mode] = {"wall_s": round(wall, 1), "save_s": {k: round(v, 3) for k, v in sorted(saves.items())},
                            "commit_s": {k: round(v, 3) for k, v in sorted(commits.items())},
                            "stall_per_checkpoint_s": [round(s, 3) for s in stalls],
                            "median_stall_s": round(statistics.median(stalls), 3)}
    ratio = report["asynchronous"]["median_stall_s"] / report["synchronous"]["median_stall_s"]
    print(json.dumps({"model": {"d_model": args.d_model, "layers": args.layers, "d_ff": 4 * args.d_model},
                      "workers": args.workers,
                      "runs": report, "async_over_sync_stall": round(ratio, 3), "target_ratio": TARGET_RATIO,
                      "target_met": ratio <= TARGET_RATIO}, indent=2))


if __name__ == "__main__":
    main()
