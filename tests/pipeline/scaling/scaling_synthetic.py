"""Synthetic runs from known scaling-law parameters, shared by the scaling tests."""

from __future__ import annotations

import numpy as np

from pipeline.scaling.fit_inputs import ScalingPoint

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


def true_n_opt(C):
    """The compute-optimal N of the TRUE law at C = 6 N D."""
    return TRUE_G * (C / 6) ** TRUE_A_EXPONENT


def noisy_isoflop_points(seed=0, noise=0.002, **kwargs) -> list[ScalingPoint]:
    """isoflop_points with each loss times exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    points = isoflop_points(**kwargs)
    for p in points:
        p.loss *= float(np.exp(rng.normal(0, noise)))
    return points


def synthetic_curves(sizes=np.logspace(7, 10, 13), tokens=np.logspace(8, 12, 40)):
    """Training curves of the TRUE law: every size logs its loss at the same log-spaced token counts."""
    from pipeline.scaling.fit_inputs import TrainingCurve

    return [TrainingCurve(f"N{N:.3g}", float(N), [float(D) for D in tokens], [float(true_loss(N, D)) for D in tokens])
            for N in sizes]


# Muennighoff et al.'s data-constrained law, with their fitted R*_D, on top of TRUE.
TRUE_R_STAR_D = 15.4


def repeated_data_points(seed=0, noise=0.001, epochs=(1, 2, 4, 8, 16, 32, 64)) -> list[ScalingPoint]:
    """5 sizes x 2 unique-token budgets x the epochs given, losses of the data-constrained law."""
    from pipeline.scaling.data_constrained import effective_data

    rng = np.random.default_rng(seed)
    points = []
    for N in np.logspace(7, 9.5, 5):
        for unique in (3e8, 3e9):
            for ep in epochs:
                D = unique * ep
                d_eff = effective_data(D, ep, TRUE_R_STAR_D)
                loss = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / d_eff ** TRUE["beta"]
                points.append(ScalingPoint(N, D, float(loss) * float(np.exp(rng.normal(0, noise))), epochs=float(ep)))
    return points
