"""Approach 3's fit with its default bootstrap: seconds, and the intervals against the old way in the same run.

The old way (the baseline): every bootstrap replicate refitted from 300 starts drawn from the whole grid, with only
the full-data optimum beside them. The default now reuses the full-data fit's work: its optimum and the other
distinct optima its grid pass reached, plus sweep.bootstrap_starts (24) grid starts per replicate. Both run on the
same points with the same resamples; the report gives each one's seconds, their ratio, whether the estimates are
identical and the largest relative difference of any interval bound (target: at most 20 s, within 1%).

The points: --csv (columns N, D, loss, optionally C: e.g. Chinchilla's 245 runs as Epoch extracted them,
epoch-research/analyzing-chinchilla data/svg_extracted_data.csv with D = C / 6N), else 243 synthetic IsoFLOP runs
(9 budgets from 1e18 to 1e22 FLOPs x 27 sizes) from Hoffmann et al.'s fitted law with 1% noise.

    python -m benchmarks.scaling_fit
    python -m benchmarks.scaling_fit --csv chinchilla.csv
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def synthetic_points(seed: int = 0):
    from pipeline.scaling.fit_inputs import ScalingPoint

    rng = np.random.default_rng(seed)
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    points = []
    for C in np.logspace(18, 22, 9):
        n_opt = 0.6 * (C / 6) ** 0.5
        for N in n_opt * np.logspace(-1, 1, 27):
            D = C / (6 * N)
            loss = (E + A / N**alpha + B / D**beta) * float(np.exp(rng.normal(0, 0.01)))
            points.append(ScalingPoint(N=float(N), D=float(D), loss=loss, C=float(C)))
    return points


def timed_fit(points, **options):
    from pipeline.scaling.approach3 import fit_chinchilla

    started = time.perf_counter()
    fit = fit_chinchilla(points, **options)
    return fit, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=None, help="runs to fit (default: 243 synthetic IsoFLOP runs)")
    args = parser.parse_args()
    import pipeline.scaling.approach3 as approach3
    from pipeline.scaling.fit_inputs import load_points_csv

    points = load_points_csv(args.csv) if args.csv else synthetic_points()
    fit, seconds = timed_fit(points)
    known = approach3._replicate_starts
    # The baseline: 300 grid starts per replicate and the full-data optimum alone beside them.
    approach3._replicate_starts = lambda theta, grid, n, k, seed, basins=None: known(theta, grid, n, k, seed)
    try:
        old, old_seconds = timed_fit(points, bootstrap_starts=300)
    finally:
        approach3._replicate_starts = known
    names = ["E", "A", "B", "alpha", "beta"]
    worst = max(abs(new - ref) / abs(ref) for name, (lo, hi) in old.intervals.items()
                for new, ref in zip(fit.intervals[name], (lo, hi), strict=True))
    report = {
        "points": len(points), "source": args.csv or "synthetic (Hoffmann et al.'s law, 1% noise)",
        "seconds_default": round(seconds, 2), "seconds_baseline_300_starts": round(old_seconds, 2),
        "time_ratio": round(seconds / old_seconds, 3),
        "starts_per_replicate": fit.bootstrap_info.get("starts_per_replicate"),
        "estimates_identical": [getattr(fit, n) for n in names] == [getattr(old, n) for n in names],
        "largest_interval_difference": worst,
        "intervals": fit.intervals, "intervals_baseline": old.intervals,
        "targets": {"seconds": 20, "interval_difference": 0.01},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
