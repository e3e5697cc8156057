"""The runs the fits take: ScalingPoint (a run's final N, D and loss), TrainingCurve (a run's loss along its
tokens), the points CSV (load_points_csv, write_points_csv) and the runs grouped by compute budget
(budget_groups, group_by_budget).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError


@dataclass
class ScalingPoint:
    """One training run: N parameters, D training tokens, final loss (nats/token); C = 6 N D unless given.

    N is the count the compute formula uses (total parameters); N_nonembedding, when known, is Kaplan's N
    (without embedding tables). budget labels the IsoFLOP budget or grid cell the run belongs to. epochs,
    when known, is the number of passes over the unique training tokens (D / U_D): above 1 the run repeated
    data, and the data-constrained fit (fit_data_constrained) discounts the repeats.
    """

    N: float
    D: float
    loss: float
    C: float | None = None
    budget: str | None = None
    N_nonembedding: float | None = None
    epochs: float | None = None

    def compute(self) -> float:
        """Training FLOPs: the recorded C, or 6 N D."""
        return self.C if self.C else 6.0 * self.N * self.D


CSV_COLUMNS = ["N", "D", "loss", "C", "budget", "N_nonembedding", "epochs"]


def load_points_csv(path: str | Path) -> list[ScalingPoint]:
    """Runs from a CSV with columns N, D, loss and optionally C, budget, N_nonembedding, epochs (empty or
    missing = unknown: CSVs written before a column existed still load)."""
    if not Path(path).is_file():
        raise ConfigError(f"{path} is not a file: pass csv=<a CSV with columns N,D,loss>, or fit a sweep with sweep=<sweep id>")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path} holds no runs: it needs a header N,D,loss (optionally C) and one row per run")
    missing = {"N", "D", "loss"} - set(rows[0])
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: it needs N, D, loss (and C)")
    points = []
    for line, r in enumerate(rows, start=2):
        try:
            points.append(ScalingPoint(
                N=float(r["N"]), D=float(r["D"]), loss=float(r["loss"]),
                C=float(r["C"]) if r.get("C") else None,
                budget=r.get("budget") or None,
                N_nonembedding=float(r["N_nonembedding"]) if r.get("N_nonembedding") else None,
                epochs=float(r["epochs"]) if r.get("epochs") else None,
            ))
        except ValueError as err:
            raise ConfigError(f"{path}, line {line}: {err}; N, D, loss (and C, epochs) must be numbers") from err
        if min(points[-1].N, points[-1].D, points[-1].loss) <= 0:
            raise ConfigError(f"{path}, line {line}: N, D and loss must be positive, got {r}")
        if points[-1].epochs is not None and points[-1].epochs <= 0:
            raise ConfigError(f"{path}, line {line}: epochs (passes over the unique tokens) must be positive, got {r}")
    return points


def write_points_csv(points: list[ScalingPoint], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for p in points:
            # repr of a float round-trips exactly.
            writer.writerow({"N": repr(float(p.N)), "D": repr(float(p.D)), "loss": repr(float(p.loss)),
                             "C": repr(float(p.compute())), "budget": p.budget or "",
                             "N_nonembedding": "" if p.N_nonembedding is None else repr(float(p.N_nonembedding)),
                             "epochs": "" if p.epochs is None else repr(float(p.epochs))})


def _log_arrays(points: list[ScalingPoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    log_n = np.log(np.array([p.N for p in points], dtype=float))
    log_d = np.log(np.array([p.D for p in points], dtype=float))
    log_l = np.log(np.array([p.loss for p in points], dtype=float))
    return log_n, log_d, log_l


@dataclass
class TrainingCurve:
    """One run's training curve: tokens seen D and loss at its logged steps, for a model of N parameters.
    A run known only by its final loss is a curve of one point."""

    run: str
    N: float
    D: list[float]
    loss: list[float]
    N_nonembedding: float | None = None


def curves_from_points(points: list[ScalingPoint]) -> list[TrainingCurve]:
    """Each run's final point as a one-point curve (what approach 1 gets when no curves were logged)."""
    return [TrainingCurve(run=p.budget or f"run {i}", N=p.N, D=[p.D], loss=[p.loss], N_nonembedding=p.N_nonembedding)
            for i, p in enumerate(points)]


def budget_groups(points: list[ScalingPoint], rel_tol: float = 0.05) -> list[np.ndarray]:
    """Indices of the runs in each compute budget, cheapest budget first: walking up in compute, a run whose
    C lies within rel_tol of its group's first C joins that group (group_by_budget's grouping)."""
    computes = [p.compute() for p in points]
    groups: list[list[int]] = []
    for i in np.argsort(computes, kind="stable"):
        if groups and abs(computes[i] - computes[groups[-1][0]]) <= rel_tol * computes[groups[-1][0]]:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g) for g in groups]


def group_by_budget(points: list[ScalingPoint], rel_tol: float = 0.05) -> dict[float, list[ScalingPoint]]:
    """Points grouped by compute: runs whose C lies within rel_tol of a group's first C join it. The key is
    the group's geometric-mean compute."""
    groups = [[points[i] for i in g] for g in budget_groups(points, rel_tol)]
    return {float(np.exp(np.mean(np.log([p.compute() for p in g])))): g for g in groups}
