"""The same IsoFLOP grid two ways: one run per point (today's sweep, cosine schedule) and WSD decay branches
(one run per model size, each shorter budget a branch from its stable phase: sweep.branches=true).

Both sweeps train on Shakespeare through `pipeline sweep` (real Ray, DeepSpeed, MLflow) in the same process
tree, one after the other. The report gives, for each: the compute spent (6 N D summed over what was trained;
a branch counts only its decay), the wall time, and the fitted exponents (approach 3's a = beta / (alpha +
beta) and b, approach 2's a) with their intervals, and whether the two sweeps' exponents agree (each point
estimate inside the other's interval). The compute ratio is the benchmark's target: branches < separate runs.

    python -m benchmarks.scaling_branches [--out DIR] [--overrides sweep.budgets_flops=[1e10,3e10,1e11] ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(out: Path, overrides: list[str]) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "sweep=isoflop_tiny", *overrides,
                           f"output_dir={out}"], capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"sweep in {out} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    sweep_id = (out / "scaling" / "latest").read_text().strip()
    report = json.loads((out / "scaling" / sweep_id / "scaling_fit.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id],
                              filter_string=f"tags.sweep_id = '{sweep_id}' and attributes.run_name = '{sweep_id}'")
    metrics = runs[0].data.metrics
    return {"wall_s": wall, "report": report, "compute": metrics["sweep_compute_flops"],
            "separate_compute": metrics["separate_runs_compute_flops"]}


def exponents(report: dict) -> dict:
    a3, a2 = report.get("approach3", {}), report.get("approach2", {})
    out = {}
    if "error" not in a3:
        out["approach3_a"] = (a3["a"], a3["intervals"].get("a"))
        out["approach3_b"] = (a3["b"], a3["intervals"].get("b"))
    if "error" not in a2:
        out["approach2_a"] = (a2["a"], a2.get("a_bootstrap_interval") or a2.get("a_interval"))
    return out


def agree(x: tuple, y: tuple) -> bool | None:
    """Each point estimate inside the other's interval (None when either lacks an interval)."""
    (vx, ix), (vy, iy) = x, y
    if not ix or not iy:
        return None
    return bool(ix[0] <= vy <= ix[1] and iy[0] <= vx <= iy[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="scaling_branches_"))
    separate = sweep(root / "separate", args.overrides)
    branched = sweep(root / "branches", [*args.overrides, "sweep.branches=true", "train.schedule=wsd"])
    rows = {"separate runs (cosine)": separate, "WSD branches": branched}
    print(f"{'sweep':24} {'compute 6ND':>12} {'wall s':>8}  exponents [interval]")
    for name, r in rows.items():
        ex = "  ".join(f"{k}={v:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
                       for k, (v, iv) in exponents(r["report"]).items())
        print(f"{name:24} {r['compute']:12.3g} {r['wall_s']:8.0f}  {ex}")
    ratio = branched["compute"] / separate["compute"]
    verdicts = {k: agree(exponents(separate["report"])[k], exponents(branched["report"])[k])
                for k in exponents(separate["report"]) if k in exponents(branched["report"])}
    print(f"compute ratio (branches / separate): {ratio:.3f}; wall-time ratio "
          f"{branched['wall_s'] / separate['wall_s']:.3f}")
    print("exponents agree within their intervals: " + ", ".join(f"{k}: {v}" for k, v in verdicts.items()))
    result = {"compute_ratio": ratio, "wall_ratio": branched["wall_s"] / separate["wall_s"], "agree": verdicts,
              "separate": {k: v for k, v in separate.items() if k != "report"} | {"exponents": exponents(separate["report"])},
              "branches": {k: v for k, v in branched.items() if k != "report"} | {"exponents": exponents(branched["report"])}}
    (root / "scaling_branches.json").write_text(json.dumps(result, indent=2))
    print(f"results: {root / 'scaling_branches.json'}")


if __name__ == "__main__":
    main()
