"""Scaling-law plots (PNG): losses against N per budget, IsoFLOP parabolas with minima, the frontier."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.scaling.fit import ChinchillaFit, IsoFLOPFit, IsoFLOPMinima, ScalingPoint, group_by_budget


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_n(points: list[ScalingPoint], fit: ChinchillaFit | None, path: Path) -> Path:
    """Observed losses against N, one colour per compute budget, with the approach-3 fit along D = C/6N."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    groups = group_by_budget(points)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    for color, (C, group) in zip(colors, groups.items(), strict=True):
        ns = np.array([p.N for p in group])
        ax.scatter(ns, [p.loss for p in group], color=color, label=f"C = {C:.2g}", zorder=3)
        if fit is not None:
            grid = np.logspace(np.log10(ns.min() / 1.5), np.log10(ns.max() * 1.5), 100)
            ax.plot(grid, fit.loss(grid, C / (6 * grid)), color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs model size per compute budget (lines: approach 3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_isoflop(points: list[ScalingPoint], minima: IsoFLOPMinima, path: Path) -> Path:
    """Each budget's losses with its parabola in ln N; minima inside the sizes trained are starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    groups = group_by_budget(points)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(groups)))
    for color, (C, group) in zip(colors, groups.items(), strict=True):
        ns = np.array([p.N for p in group])
        ax.scatter(ns, [p.loss for p in group], color=color, label=f"C = {C:.2g}", zorder=3)
        for budget, coeffs, n_opt, l_opt in zip(minima.budgets, minima.parabolas, minima.n_opt, minima.loss_opt,
                                                strict=True):
            if abs(budget - C) <= 0.05 * C:
                x = np.linspace(np.log(ns.min() / 1.3), np.log(ns.max() * 1.3), 100)
                ax.plot(np.exp(x), np.polyval(coeffs, x), color=color, alpha=0.7)
                if n_opt is not None:
                    ax.scatter([n_opt], [l_opt], color=color, marker="*", s=180, edgecolor="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("IsoFLOP curves (approach 2), minima starred")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_frontier(fit: ChinchillaFit | None, iso: IsoFLOPFit | None, budgets: list[float], path: Path) -> Path:
    """Compute-optimal N against compute from both approaches, extrapolated to the requested budgets."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    known = (iso.budgets if iso else []) + list(budgets)
    c_grid = np.logspace(np.log10(min(known) / 2), np.log10(max(known) * 2), 100)
    if fit is not None:
        ax.plot(c_grid, [fit.compute_optimal(c)[0] for c in c_grid], label=f"approach 3: N ∝ C^{fit.a:.3f}")
    if iso is not None:
        ax.scatter(iso.budgets, iso.n_opt, color="black", zorder=3, label="IsoFLOP minima")
        ax.plot(c_grid, iso.n_law(c_grid), linestyle="--", label=f"approach 2: N ∝ C^{iso.n_law.exponent:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("compute-optimal parameters N_opt")
    ax.set_title("Compute-optimal frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
