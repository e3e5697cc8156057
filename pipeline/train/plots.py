"""Plots logged as MLflow artifacts."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(steps: list[int], losses: list[float], path: Path, title: str,
                    val: list[tuple[int, float]] | None = None, unigram: float | None = None) -> Path:
    """Training loss by step; with val, the validation loss at its steps; with unigram, the unigram baseline's
    validation loss (what a model that learned nothing about context reaches) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, marker="o", markersize=2, label="training loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], marker="s", markersize=4, label="validation loss")
    if unigram is not None:
        ax.axhline(unigram, color="grey", linestyle="--", linewidth=1, label="unigram baseline (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    if val or unigram is not None:
        ax.legend()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
