"""Scaling-law fits recover known parameters from synthetic runs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.scaling.fit import (
    ChinchillaFit,
    ScalingPoint,
    compute_optimal_interval,
    fit_chinchilla,
    fit_isoflop,
    fit_kaplan,
    load_points_csv,
    write_points_csv,
)

TRUE = dict(E=1.8, A=400.0, B=1200.0, alpha=0.34, beta=0.28)


def true_loss(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def synthetic_grid(seed: int, noise: float = 0.002) -> list[ScalingPoint]:
    rng = np.random.default_rng(seed)
    return [ScalingPoint(N, D, true_loss(N, D) * np.exp(rng.normal(0, noise)))
            for N in np.logspace(7, 10, 5) for D in np.logspace(8, 12, 6)]


@pytest.fixture(scope="module")
def fitted():
    return fit_chinchilla(synthetic_grid(seed=1), n_bootstrap=100, seed=1)


def test_approach_3_recovers_the_parameters(fitted):
    assert fitted.alpha == pytest.approx(TRUE["alpha"], rel=0.02)
    assert fitted.beta == pytest.approx(TRUE["beta"], rel=0.02)
    assert pytest.approx(TRUE["E"], rel=0.01) == fitted.E


def test_true_values_fall_inside_the_bootstrap_intervals(fitted):
    for name in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fitted.intervals[name]
        assert lo < TRUE[name] < hi, (name, lo, hi)
        assert lo <= getattr(fitted, name) <= hi
    lo, hi = fitted.intervals["a"]
    assert lo < TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]) < hi


def test_fit_is_stable_across_initial_grids():
    points = synthetic_grid(seed=1)
    rng = np.random.default_rng(7)
    results = []
    for _ in range(3):
        grid = {"a": rng.uniform(0, 25, 4), "b": rng.uniform(0, 25, 4), "e": rng.uniform(-1, 1, 3),
                "alpha": rng.uniform(0, 2, 4), "beta": rng.uniform(0, 2, 4)}
        fit = fit_chinchilla(points, grid=grid, n_bootstrap=0)
        results.append((fit.E, fit.alpha, fit.beta))
    for E, alpha, beta in results[1:]:
        assert pytest.approx(results[0][0], rel=1e-3) == E
        assert alpha == pytest.approx(results[0][1], rel=1e-3)
        assert beta == pytest.approx(results[0][2], rel=1e-3)


def test_published_chinchilla_parameters_give_tens_of_billions_at_gopher_compute():
    fit = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, n_points=0)
    n_opt, d_opt, loss = fit.compute_optimal(5.76e23)
    assert 1e10 <= n_opt < 1e11
    assert 6 * n_opt * d_opt == pytest.approx(5.76e23, rel=1e-9)
    assert loss == pytest.approx(fit.loss(n_opt, d_opt))
    # The optimum really is the minimum along the IsoFLOP curve.
    for factor in (0.8, 1.25):
        assert fit.loss(n_opt * factor, 5.76e23 / (6 * n_opt * factor)) > loss


def test_compute_optimal_intervals_bracket_the_point_estimate(fitted):
    n_opt, d_opt, loss = fitted.compute_optimal(1e21)
    intervals = compute_optimal_interval(fitted, 1e21)
    assert intervals["N_opt"][0] <= n_opt <= intervals["N_opt"][1]
    assert intervals["loss"][0] <= loss <= intervals["loss"][1]


def isoflop_points(budgets=(1e18, 1e19, 1e20, 1e21), sizes=9) -> list[ScalingPoint]:
    points = []
    for C in budgets:
        n_star = (C / 6) ** 0.45
        for N in n_star * np.logspace(-1, 1, sizes):
            D = C / (6 * N)
            points.append(ScalingPoint(N, D, true_loss(N, D), C=C))
    return points


def test_approach_2_recovers_the_exponent():
    fit = fit_isoflop(isoflop_points())
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit.n_law.exponent == pytest.approx(a, rel=0.03)
    assert fit.d_law.exponent == pytest.approx(1 - a, rel=0.03)
    assert len(fit.budgets) == 4


def test_kaplan_recovers_a_planted_exponent():
    points = [ScalingPoint(N, 1e12, (8.8e13 / N) ** 0.076) for N in np.logspace(6, 10, 8)]
    fit = fit_kaplan(points)
    assert fit.alpha_N == pytest.approx(0.076, rel=1e-6)
    assert fit.N_c == pytest.approx(8.8e13, rel=1e-4)


def test_csv_round_trip(tmp_path):
    points = isoflop_points(budgets=(1e18,), sizes=3)
    write_points_csv(points, tmp_path / "p.csv")
    loaded = load_points_csv(tmp_path / "p.csv")
    got = np.array([(p.N, p.D, p.loss, p.compute()) for p in loaded])
    want = np.array([(p.N, p.D, p.loss, p.compute()) for p in points])
    assert np.allclose(got, want, rtol=1e-12)
    (tmp_path / "bad.csv").write_text("N,loss\n1,2\n")
    with pytest.raises(ValueError, match="lacks the column"):
        load_points_csv(tmp_path / "bad.csv")
