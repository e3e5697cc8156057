"""Synthetic runs from known scaling-law parameters, shared by the scaling tests."""

from __future__ import annotations

import numpy as np

from pipeline.scaling.fit import ScalingPoint

TRUE = dict(E=1.8, A=400.0, B=1200.0, alpha=0.34, beta=0.28)
TRUE_A_EXPONENT = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
TRUE_G = (TRUE["alpha"] * TRUE["A"] / (TRUE["beta"] * TRUE["B"])) ** (1 / (TRUE["alpha"] + TRUE["beta"]))


def true_loss(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def synthetic_grid(seed: int, noise: float = 0.002) -> list[ScalingPoint]:
    """5 sizes (1e7..1e10 parameters) x 6 token counts (1e8..1e12), loss times exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    return [ScalingPoint(N, D, true_loss(N, D) * np.exp(rng.normal(0, noise)))
            for N in np.logspace(7, 10, 5) for D in np.logspace(8, 12, 6)]


def isoflop_points(budgets=(1e18, 1e19, 1e20, 1e21), sizes=9, centre_exponent=0.45) -> list[ScalingPoint]:
    points = []
    for C in budgets:
        n_star = (C / 6) ** centre_exponent
        for N in n_star * np.logspace(-1, 1, sizes):
            D = C / (6 * N)
            points.append(ScalingPoint(N, D, true_loss(N, D), C=C))
    return points
