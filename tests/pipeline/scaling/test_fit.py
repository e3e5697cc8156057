"""Scaling-law fits recover known parameters from synthetic runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scaling_synthetic import TRUE, TRUE_A_EXPONENT, TRUE_G, isoflop_points, synthetic_grid

from pipeline.scaling.approach2 import fit_isoflop
from pipeline.scaling.approach3 import (
    ChinchillaFit,
    compute_optimal_allocation,
    compute_optimal_interval,
    fit_chinchilla,
)
from pipeline.scaling.fit_inputs import ScalingPoint, load_points_csv, write_points_csv
from pipeline.scaling.kaplan import compute_frontier, fit_kaplan
from pipeline.scaling.lbfgs import lbfgs_batch, minimise_from_grid
from pipeline.scaling.objective import batch_objective, make_grid


def log_arrays(points):
    return (np.log([p.N for p in points]), np.log([p.D for p in points]), np.log([p.loss for p in points]))


@pytest.fixture(scope="module")
def fitted():
    return fit_chinchilla(synthetic_grid(seed=1), n_bootstrap=100, seed=1)


def test_objective_gradient_matches_finite_differences():
    log_n, log_d, log_l = log_arrays(synthetic_grid(seed=2))
    rng = np.random.default_rng(0)
    # Starts near the optimum (residuals inside the Huber quadratic zone) and far from it (linear zone).
    thetas = np.vstack([[6.0, 7.1, 0.59, 0.34, 0.28], rng.uniform([0, 0, -1, 0.1, 0.1], [25, 25, 1, 2, 2], (5, 5))])
    _, grad = batch_objective(thetas, log_n[None], log_d[None], log_l[None])
    eps = 1e-6
    for k in range(5):
        step = np.zeros(5)
        step[k] = eps
        up, _ = batch_objective(thetas + step, log_n[None], log_d[None], log_l[None])
        down, _ = batch_objective(thetas - step, log_n[None], log_d[None], log_l[None])
        numeric = (up - down) / (2 * eps)
        assert np.allclose(grad[:, k], numeric, rtol=1e-4, atol=1e-9), (k, grad[:, k], numeric)


def test_batched_lbfgs_solves_each_row_on_its_own_data():
    """The bootstrap batches replicates with different data: row j must see only its own data set."""
    sets = [log_arrays(synthetic_grid(seed=s)) for s in (3, 4)]
    start = np.array([[6.0, 7.0, 0.5, 0.3, 0.3]])
    alone = [lbfgs_batch(start, n[None], d[None], loss[None])[0][0] for n, d, loss in sets]
    stacked = [np.stack([s[i] for s in sets]) for i in range(3)]
    together, _ = lbfgs_batch(np.repeat(start, 2, axis=0), *stacked)
    assert np.allclose(together, np.array(alone), rtol=1e-6)
    assert not np.allclose(together[0], together[1], rtol=1e-4)  # the two data sets give different fits


def test_approach_3_recovers_the_parameters(fitted):
    assert fitted.alpha == pytest.approx(TRUE["alpha"], rel=0.02)
    assert fitted.beta == pytest.approx(TRUE["beta"], rel=0.02)
    assert pytest.approx(TRUE["E"], rel=0.01) == fitted.E
    assert pytest.approx(TRUE["A"], rel=0.15) == fitted.A
    assert pytest.approx(TRUE["B"], rel=0.15) == fitted.B
    assert fitted.a == pytest.approx(TRUE_A_EXPONENT, rel=0.02)
    assert fitted.a + fitted.b == pytest.approx(1.0)
    assert fitted.objective > 0 and fitted.n_points == 30


def test_true_values_fall_inside_the_bootstrap_intervals(fitted):
    truth = TRUE | {"a": TRUE_A_EXPONENT, "b": 1 - TRUE_A_EXPONENT, "G": TRUE_G}
    for name, value in truth.items():
        lo, hi = fitted.intervals[name]
        assert lo < value < hi, (name, lo, hi)
        assert lo <= getattr(fitted, name) <= hi, name
    assert len(fitted.bootstrap_params) == 100
    # Intervals are informative, not the whole grid: alpha's 95% interval spans a few percent.
    lo, hi = fitted.intervals["alpha"]
    assert hi - lo < 0.1 * TRUE["alpha"]


def test_bootstrap_is_seeded():
    points = synthetic_grid(seed=5)
    small = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [0.0, 0.5], "alpha": [0.5], "beta": [0.5]}
    first = fit_chinchilla(points, grid=small, n_bootstrap=20, seed=3)
    again = fit_chinchilla(points, grid=small, n_bootstrap=20, seed=3)
    other = fit_chinchilla(points, grid=small, n_bootstrap=20, seed=4)
    assert first.intervals == again.intervals
    assert first.intervals != other.intervals


def test_fit_is_stable_across_initial_grids(fitted):
    points = synthetic_grid(seed=1)
    log_n, log_d, log_l = log_arrays(points)
    rng = np.random.default_rng(7)
    for _ in range(3):
        grid = make_grid({"a": rng.uniform(0, 25, 4), "b": rng.uniform(0, 25, 4), "e": rng.uniform(-1, 1, 3),
                          "alpha": rng.uniform(0, 2, 4), "beta": rng.uniform(0, 2, 4)})
        theta, value, _ = minimise_from_grid(log_n, log_d, log_l, grid)
        assert value == pytest.approx(fitted.objective, rel=1e-6)
        assert np.exp(theta[2]) == pytest.approx(fitted.E, rel=1e-4)
        assert theta[3] == pytest.approx(fitted.alpha, rel=1e-4)
        assert theta[4] == pytest.approx(fitted.beta, rel=1e-4)


def test_smaller_grid_argument_is_used():
    points = synthetic_grid(seed=1)
    assert len(make_grid()) == 6 * 6 * 5 * 5 * 5  # Hoffmann et al.'s 4,500 starts
    assert len(make_grid({"alpha": [0.5], "beta": [0.5]})) == 6 * 6 * 5
    with pytest.raises(ValueError, match="not parameters"):
        make_grid({"gamma": [1.0]})
    small = {"a": [0.0, 10.0], "b": [0.0, 10.0], "e": [0.0, 1.0], "alpha": [0.5, 1.0], "beta": [0.5, 1.0]}
    fit = fit_chinchilla(points, grid=small, n_bootstrap=0)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.02)
    assert fit.intervals == {} and compute_optimal_interval(fit, 1e21) == {}


def test_approach_3_needs_five_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_chinchilla(synthetic_grid(seed=1)[:4])


def test_published_chinchilla_parameters_give_tens_of_billions_at_gopher_compute():
    fit = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, n_points=0)
    n_opt, d_opt, loss = fit.compute_optimal(5.76e23)
    assert 1e10 <= n_opt < 1e11
    assert 6 * n_opt * d_opt == pytest.approx(5.76e23, rel=1e-9)
    assert loss == pytest.approx(fit.loss(n_opt, d_opt))
    # The optimum really is the minimum along the IsoFLOP curve.
    for factor in (0.8, 1.25):
        assert fit.loss(n_opt * factor, 5.76e23 / (6 * n_opt * factor)) > loss


def test_degenerate_bootstrap_replicates_do_not_break_the_intervals():
    # A replicate of a poorly constrained real sweep can drive A = exp(theta_a) to 0: G underflows to 0 in floating point.
    good = [1.7, 400.0, 400.0, 0.34, 0.28]
    fit = ChinchillaFit(*good, objective=0.0, n_points=12, bootstrap_params=[good, [0.0, 0.0, 17.0, 5.0, 0.1]] * 50)
    assert fit.bootstrap_fits()[1].compute_optimal(1e21)[0] == 0.0
    intervals = compute_optimal_interval(fit, 1e21)
    assert intervals["N_opt"][0] == 0.0 and intervals["N_opt"][1] == pytest.approx(fit.compute_optimal(1e21)[0])


def test_compute_optimal_allocation_and_intervals(fitted):
    C = 1e21
    n_opt, d_opt, loss = fitted.compute_optimal(C)
    intervals = compute_optimal_interval(fitted, C)
    for key, value in (("N_opt", n_opt), ("D_opt", d_opt), ("loss", loss)):
        assert intervals[key][0] <= value <= intervals[key][1], key
    truth = ChinchillaFit(**TRUE, objective=0.0, n_points=0).compute_optimal(C)
    assert intervals["N_opt"][0] < truth[0] < intervals["N_opt"][1]
    allocation = compute_optimal_allocation(fitted, C)
    assert allocation["N_opt"] == n_opt and allocation["tokens_per_param"] == pytest.approx(d_opt / n_opt)
    assert allocation["intervals"]["loss"] == list(intervals["loss"])


def test_approach_2_recovers_the_exponent():
    fit = fit_isoflop(isoflop_points())
    assert fit.a == pytest.approx(TRUE_A_EXPONENT, rel=0.03)
    assert fit.b == pytest.approx(1 - TRUE_A_EXPONENT, rel=0.03)
    assert len(fit.budgets) == 4
    lo, hi = fit.n_law.exponent_interval
    assert lo < fit.a < hi
    # Each IsoFLOP minimum is near the true minimum of the loss along its budget.
    for C, n_opt in zip(fit.budgets, fit.n_opt, strict=True):
        true_n = ChinchillaFit(**TRUE, objective=0.0, n_points=0).compute_optimal(C)[0]
        assert n_opt == pytest.approx(true_n, rel=0.15)
    prediction = fit.compute_optimal(1e23)
    assert prediction["intervals"]["N_opt"][0] < prediction["N_opt"] < prediction["intervals"]["N_opt"][1]


def test_approach_2_refuses_budgets_whose_minimum_lies_outside_the_sizes():
    # Every size far above the optimum: the parabolas' vertices fall below the smallest size trained.
    with pytest.raises(ValueError, match="inside the sizes trained"):
        fit_isoflop(isoflop_points(sizes=5, centre_exponent=0.7))


def test_kaplan_recovers_planted_exponents():
    # L(N) on the best loss of each size; a worse run at a smaller D must not change it.
    points = [ScalingPoint(N, 1e12, (8.8e13 / N) ** 0.076) for N in np.logspace(6, 10, 8)]
    points += [ScalingPoint(N, 1e9, 1.1 * (8.8e13 / N) ** 0.076) for N in np.logspace(6, 10, 8)]
    fit = fit_kaplan(points)
    assert fit.alpha_N == pytest.approx(0.076, rel=1e-6)
    assert fit.N_c == pytest.approx(8.8e13, rel=1e-4)
    assert fit.n_basis == "N"

    # L(C) on the frontier: per budget one run on the law, others above it.
    runs = []
    for C in np.logspace(15, 21, 7):
        best = (3.1e8 / C) ** 0.05
        for N, excess in ((1e6, 0.2), (1e7, 0.0), (1e8, 0.1)):
            runs.append(ScalingPoint(N, C / (6 * N), best + excess))
    assert len(compute_frontier(runs)) == 7
    fit = fit_kaplan(runs)
    assert fit.alpha_C == pytest.approx(0.05, rel=1e-6)
    assert fit.C_c == pytest.approx(3.1e8, rel=1e-4)


def test_a_nearly_flat_kaplan_law_reports_an_unbounded_critical_size_instead_of_failing_the_fit(tmp_path):
    """Sizes whose losses barely differ (a tiny sweep) give alpha near 0 and an N_c beyond a float: infinite,
    written to the report as null, and every other fit still reported (it raised OverflowError)."""
    from pipeline.scaling.report import write_report

    points = [ScalingPoint(N, D, 4.9 - 1e-4 * np.log(N) + 0.01 * np.log(1e6 / D)) for N in (3e3, 1e4, 3e4)
              for D in (1e5, 3e5)]
    fit = fit_kaplan(points)
    assert 0 < fit.alpha_N < 1e-3 and fit.N_c == float("inf")
    report = json.loads((write_report(points, tmp_path, [1e21], n_bootstrap=0) and tmp_path / "scaling_fit.json")
                        .read_text())
    assert report["kaplan"]["N_c"] is None and "approach3" in report


def test_kaplan_uses_non_embedding_counts_when_every_run_has_them():
    points = [ScalingPoint(N + 5e6, 1e12, (8.8e13 / N) ** 0.076, N_nonembedding=N) for N in np.logspace(6, 10, 8)]
    fit = fit_kaplan(points)
    assert fit.n_basis == "N_nonembedding"
    assert fit.alpha_N == pytest.approx(0.076, rel=1e-6)


def test_csv_round_trip(tmp_path):
    points = isoflop_points(budgets=(1e18,), sizes=3)
    points[0].budget, points[1].N_nonembedding, points[2].epochs = "C1e18", 12345.0, 2.5
    write_points_csv(points, tmp_path / "p.csv")
    loaded = load_points_csv(tmp_path / "p.csv")
    got = np.array([(p.N, p.D, p.loss, p.compute()) for p in loaded])
    want = np.array([(p.N, p.D, p.loss, p.compute()) for p in points])
    assert np.array_equal(got, want)  # repr keeps every bit
    assert loaded[0].budget == "C1e18" and loaded[1].N_nonembedding == 12345.0 and loaded[2].N_nonembedding is None
    assert [p.epochs for p in loaded] == [None, None, 2.5]
    # A CSV written before the epochs column existed still loads, with epochs unknown.
    (tmp_path / "old.csv").write_text("N,D,loss,C,budget,N_nonembedding\n1e6,2e7,3.5,1.2e14,b,\n")
    (old,) = load_points_csv(tmp_path / "old.csv")
    assert old.epochs is None and old.budget == "b"
    (tmp_path / "zero.csv").write_text("N,D,loss,epochs\n1e6,2e7,3.5,0\n")
    with pytest.raises(ValueError, match="epochs"):
        load_points_csv(tmp_path / "zero.csv")

    (tmp_path / "minimal.csv").write_text("N,D,loss\n1e6,2e7,3.5\n")
    (only,) = load_points_csv(tmp_path / "minimal.csv")
    assert only.compute() == 6 * 1e6 * 2e7
    (tmp_path / "bad.csv").write_text("N,loss\n1,2\n")
    with pytest.raises(ValueError, match="lacks the column"):
        load_points_csv(tmp_path / "bad.csv")
    (tmp_path / "text.csv").write_text("N,D,loss\n1e6,lots,3.5\n")
    with pytest.raises(ValueError, match="line 2"):
        load_points_csv(tmp_path / "text.csv")
