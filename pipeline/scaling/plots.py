"""Scaling-law plots (PNG): losses against N per budget, IsoFLOP parabolas with minima, the frontier.

Each plot has a *_figure function that builds the matplotlib figure (for tests and notebooks to inspect) and a
plot_* function that saves it as a PNG and closes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.scaling.approach1 import EnvelopeFit
from pipeline.scaling.approach2 import IsoFLOPFit, IsoFLOPMinima
from pipeline.scaling.approach3 import ChinchillaFit
from pipeline.scaling.fit_inputs import ScalingPoint, group_by_budget

# Up to this many groups (budgets, token counts) a legend names each colour; beyond it the legend would cover
# the data, so a colour bar over log C (or log D) replaces it.
MAX_LEGEND_GROUPS = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _groups_by_tokens(points: list[ScalingPoint], rel_tol: float = 0.05) -> dict[float, list[ScalingPoint]]:
    groups: list[list[ScalingPoint]] = []
    for p in sorted(points, key=lambda q: q.D):
        if groups and abs(p.D - groups[-1][0].D) <= rel_tol * groups[-1][0].D:
            groups[-1].append(p)
        else:
            groups.append([p])
    return {float(np.exp(np.mean(np.log([p.D for p in g])))): g for g in groups}


def _group_colours(fig, ax, keys: list[float], cmap_name: str, top: float, what: str) -> tuple[list, bool]:
    """A colour per group key; with more than MAX_LEGEND_GROUPS keys, colours from a log-scaled colour bar
    (labelled `what`) drawn beside ax. Returns the colours and whether a legend should name them."""
    plt = _pyplot()
    cmap = plt.get_cmap(cmap_name)
    if len(keys) <= MAX_LEGEND_GROUPS:
        return list(cmap(np.linspace(0, top, len(keys)))), True
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, LogNorm

    # The map's [0, top] part, as the legend's colours are (its bright yellow end is unreadable on white).
    mappable = ScalarMappable(norm=LogNorm(vmin=min(keys), vmax=max(keys)),
                              cmap=ListedColormap(cmap(np.linspace(0, top, 256))))
    fig.colorbar(mappable, ax=ax, label=what)
    return [mappable.to_rgba(k) for k in keys], False


def loss_vs_n_figure(points: list[ScalingPoint], fit: ChinchillaFit | None):
    """Observed losses against N with the approach-3 surface. An N x D grid (most runs share their D with
    another run) gets one colour per D and the curve L(N, D); IsoFLOP runs get one colour per budget and the
    curve along D = C / 6N."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    by_tokens = _groups_by_tokens(points)
    per_d = sum(len(g) for g in by_tokens.values() if len(g) > 1) >= 0.75 * len(points)
    groups = by_tokens if per_d else group_by_budget(points)
    what = "training tokens D" if per_d else "compute C (FLOPs)"
    colors, legend = _group_colours(fig, ax, list(groups), "viridis", 0.9, what)
    for color, (key, group) in zip(colors, groups.items(), strict=True):
        ns = np.array([p.N for p in group])
        label = f"D = {key:.2g} tokens" if per_d else f"C = {key:.2g} FLOPs"
        ax.scatter(ns, [p.loss for p in group], color=color, label=label, zorder=3)
        if fit is not None:
            grid = np.logspace(np.log10(ns.min() / 1.5), np.log10(ns.max() * 1.5), 100)
            ax.plot(grid, fit.loss(grid, key if per_d else key / (6 * grid)), color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    per = "per token count" if per_d else "per compute budget"
    ax.set_title(f"Loss vs model size {per} (lines: approach 3)")
    if legend:
        ax.legend(fontsize=7)
    return fig


def plot_loss_vs_n(points: list[ScalingPoint], fit: ChinchillaFit | None, path: Path) -> Path:
    return _save(loss_vs_n_figure(points, fit), path)


def isoflop_figure(points: list[ScalingPoint], minima: IsoFLOPMinima):
    """Each budget's losses with its parabola in ln N; minima inside the sizes trained are starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    groups = group_by_budget(points)
    colors, legend = _group_colours(fig, ax, list(groups), "plasma", 0.85, "compute C (FLOPs)")
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
    if legend:
        ax.legend(fontsize=8)
    return fig


def plot_isoflop(points: list[ScalingPoint], minima: IsoFLOPMinima, path: Path) -> Path:
    return _save(isoflop_figure(points, minima), path)


def frontier_figure(fit: ChinchillaFit | None, iso: IsoFLOPFit | None, budgets: list[float],
                    points: list[ScalingPoint] | None = None, envelope: EnvelopeFit | None = None):
    """Compute-optimal N against compute from approaches 1, 2 and 3 (those that fitted), extrapolated to the
    requested budgets, with the approach-3 bootstrap band and the budgets' predictions marked."""
    known = (iso.budgets if iso else []) + (envelope.budgets if envelope else []) + list(budgets)
    known += [p.compute() for p in points or []]
    if not known:
        raise ValueError("plot_frontier needs a compute range: pass budgets, runs (points) or an approach-1/2 fit")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    c_grid = np.logspace(np.log10(min(known) / 2), np.log10(max(known) * 2), 100)
    if fit is not None:
        line = ax.plot(c_grid, [fit.compute_optimal(c)[0] for c in c_grid], label=f"approach 3: N ∝ C^{fit.a:.3f}")
        boots = fit.bootstrap_fits()
        if boots:  # the band the bootstrap fits span, at the fit's confidence level
            n_boot = np.array([[b.compute_optimal(c)[0] for c in c_grid] for b in boots])
            q = 100 * (1 - fit.confidence) / 2
            ax.fill_between(c_grid, np.percentile(n_boot, q, axis=0), np.percentile(n_boot, 100 - q, axis=0),
                            color=line[0].get_color(), alpha=0.2, label=f"approach 3, {fit.confidence:.0%} bootstrap")
    if iso is not None:
        ax.scatter(iso.budgets, iso.n_opt, color="black", zorder=3, label="IsoFLOP minima")
        ax.plot(c_grid, iso.n_law(c_grid), linestyle="--", label=f"approach 2: N ∝ C^{iso.n_law.exponent:.3f}")
    if envelope is not None:
        ax.scatter(envelope.budgets, envelope.n_opt, color="grey", s=8, zorder=3, label="training-curve envelope")
        ax.plot(c_grid, envelope.n_law(c_grid), linestyle=":", label=f"approach 1: N ∝ C^{envelope.a:.3f}")
    if fit is not None and budgets:
        ax.scatter(budgets, [fit.compute_optimal(c)[0] for c in budgets], marker="x", color="red", zorder=4,
                   label="predictions (approach 3)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("compute-optimal parameters N_opt")
    ax.set_title("Compute-optimal frontier")
    ax.legend(fontsize=8)
    return fig


def plot_frontier(fit: ChinchillaFit | None, iso: IsoFLOPFit | None, budgets: list[float], path: Path,
                  points: list[ScalingPoint] | None = None, envelope: EnvelopeFit | None = None) -> Path:
    return _save(frontier_figure(fit, iso, budgets, points, envelope), path)
