"""Bootstrap intervals: resampling by budget and by run, approach 2's bootstrap, approach 3's replicates
refitted from starts across the whole grid, in memory-bounded chunks."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scaling_synthetic import (
    TRUE,
    TRUE_A_EXPONENT,
    TRUE_G,
    isoflop_points,
    noisy_isoflop_points,
    synthetic_grid,
    true_n_opt,
)

from pipeline.scaling.approach2 import fit_isoflop
from pipeline.scaling.approach3 import (
    _bootstrap,
    _bytes_per_problem,
    _identifiable,
    _replicate_starts,
    fit_chinchilla,
)
from pipeline.scaling.fit_inputs import _log_arrays, budget_groups
from pipeline.scaling.lbfgs import lbfgs_batch
from pipeline.scaling.objective import HUBER_DELTA, make_grid
from pipeline.scaling.resampling import resample_runs


def uneven_isoflop_points():
    """4 budgets of 3, 4, 5 and 6 sizes: a budget's size identifies it."""
    return [p for C, k in ((1e18, 3), (1e19, 4), (1e20, 5), (1e21, 6)) for p in isoflop_points(budgets=(C,), sizes=k)]


def test_budget_resampling_draws_whole_budgets_then_runs_within_them():
    points = uneven_isoflop_points()
    groups = [set(g.tolist()) for g in budget_groups(points)]
    assert sorted(len(g) for g in groups) == [3, 4, 5, 6]
    resamples = resample_runs(points, 300, seed=0)
    assert resamples.by == "budget+run" and resamples.note is None
    repeated_budget = missing_budget = repeated_run = False
    for replicate in resamples.replicates:
        assert len(replicate) == len(groups)  # as many budgets drawn as there are
        drawn = []
        for indices in replicate:
            (home,) = [i for i, g in enumerate(groups) if indices[0] in g]
            assert set(indices.tolist()) <= groups[home]  # all from one budget...
            assert len(indices) == len(groups[home])  # ...as many runs as it has
            drawn.append(home)
            repeated_run |= len(set(indices.tolist())) < len(indices)
        repeated_budget |= len(set(drawn)) < len(drawn)
        missing_budget |= set(drawn) != set(range(len(groups)))
    assert repeated_budget and missing_budget and repeated_run  # with replacement, at both levels
    weights = resamples.weights(len(points))
    assert weights.shape == (300, len(points))
    assert np.array_equal(weights.sum(axis=1), [sum(len(a) for a in r) for r in resamples.replicates])

    by_run = resample_runs(points, 50, seed=0, by="run")
    assert by_run.by == "run" and all(len(r) == 1 and len(r[0]) == len(points) for r in by_run.replicates)
    assert np.array_equal(resample_runs(points, 5, seed=3).weights(len(points)),
                          resample_runs(points, 5, seed=3).weights(len(points)))
    assert not np.array_equal(resample_runs(points, 5, seed=3).weights(len(points)),
                              resample_runs(points, 5, seed=4).weights(len(points)))


def test_resampling_falls_back_to_runs_without_budgets_and_says_so():
    one_budget = resample_runs(isoflop_points(budgets=(1e19,)), 3)
    assert one_budget.by == "run" and "one compute budget" in one_budget.note
    grid = resample_runs(synthetic_grid(seed=1), 3)
    assert grid.by == "run" and "N x D grid" in grid.note
    with pytest.raises(ValueError, match="budget\\+run, run"):
        resample_runs(synthetic_grid(seed=1), 3, by="budget")


def test_approach_2_bootstrap_intervals_contain_the_truth():
    for seed in range(3):
        fit = fit_isoflop(noisy_isoflop_points(seed=seed), n_bootstrap=200, seed=seed)
        lo, hi = fit.bootstrap_interval("a")
        assert lo < TRUE_A_EXPONENT < hi and lo <= fit.a <= hi and hi - lo < 0.1, (seed, lo, hi)
        lo, hi = fit.bootstrap_interval("b")
        assert lo < 1 - TRUE_A_EXPONENT < hi
        info = fit.bootstrap_info
        assert info["resample"] == "budget+run" and info["fitted"] + info["skipped"] == 200 and info["fitted"] > 150
        prediction = fit.compute_optimal(1e23)
        lo, hi = prediction["bootstrap_intervals"]["N_opt"]
        assert lo < true_n_opt(1e23) < hi and lo <= prediction["N_opt"] <= hi
        lo, hi = prediction["bootstrap_intervals"]["D_opt"]
        assert lo < 1e23 / (6 * true_n_opt(1e23)) < hi
    # The regression t-interval is still there, and so is by-run resampling.
    fit = fit_isoflop(noisy_isoflop_points(), n_bootstrap=50, resample="run")
    assert fit.n_law.exponent_interval is not None and fit.bootstrap_info["resample"] == "run"
    assert fit_isoflop(noisy_isoflop_points(), n_bootstrap=0).bootstrap_interval("a") is None


def test_approach_2_skips_replicates_it_cannot_fit():
    # 2 budgets of 3 sizes: a replicate often draws one budget twice, or repeats a size (< 3 distinct).
    points = isoflop_points(budgets=(1e18, 1e19), sizes=3)
    fit = fit_isoflop(points, n_bootstrap=100, seed=0)
    info = fit.bootstrap_info
    assert info["skipped"] > 50 and info["fitted"] + info["skipped"] == 100
    assert len(fit.bootstrap_laws) == info["fitted"] > 0
    # Every kept replicate refitted 2 distinct budgets: on this noiseless data its exponent is the fit's.
    assert np.allclose(np.array(fit.bootstrap_laws)[:, 0], fit.a, atol=1e-9)


def test_approach_3_replicates_start_across_the_whole_grid():
    grid = make_grid()
    theta = np.array([6.0, 7.1, 0.59, 0.34, 0.28])
    starts = _replicate_starts(theta, grid, 4, 300, seed=0)
    assert starts.shape == (4, 301, 5)
    assert np.array_equal(starts[:, 0], np.tile(theta, (4, 1)))  # the full-data optimum is one candidate
    for replicate in starts[:, 1:]:
        rows = {tuple(r) for r in replicate}
        assert len(rows) == 300 and rows <= {tuple(r) for r in grid}
        for axis in range(5):  # every value of every axis is represented, not one basin's neighbourhood
            assert set(replicate[:, axis]) == set(grid[:, axis])
    assert not np.array_equal(starts[0, 1:], starts[1, 1:])  # a fresh draw per replicate
    assert np.array_equal(starts, _replicate_starts(theta, grid, 4, 300, seed=0))
    assert _replicate_starts(theta, grid, 2, None, seed=0).shape == (2, len(grid) + 1, 5)
    # The other optima the full-data grid pass reached come next, the same in every replicate, before the draw.
    basins = np.array([[5.0, 6.0, 0.5, 0.3, 0.3], [4.0, 5.0, 0.4, 0.2, 0.4]])
    with_basins = _replicate_starts(theta, grid, 4, 300, seed=0, basins=basins)
    assert with_basins.shape == (4, 303, 5) and np.array_equal(with_basins[:, 1:3], np.tile(basins, (4, 1, 1)))
    assert np.array_equal(with_basins[:, 3:], starts[:, 1:])


def test_approach_3_bootstrap_by_budget_contains_the_true_parameters():
    fit = fit_chinchilla(noisy_isoflop_points(sizes=7), n_bootstrap=40, bootstrap_starts=150, seed=0)
    truth = TRUE | {"a": TRUE_A_EXPONENT, "b": 1 - TRUE_A_EXPONENT, "G": TRUE_G}
    for name, value in truth.items():
        lo, hi = fit.intervals[name]
        assert lo < value < hi and lo <= getattr(fit, name) <= hi, (name, lo, hi)
    info = fit.bootstrap_info
    # The full-data optimum, the other distinct optima of its grid pass (up to n_polish = 8), 150 grid starts.
    assert info["resample"] == "budget+run" and 151 <= info["starts_per_replicate"] <= 159
    assert info["fitted"] + info["skipped"] == 40 and len(fit.bootstrap_params) == info["fitted"]
    lo, hi = fit.intervals["alpha"]
    assert hi - lo < 0.25 * TRUE["alpha"]  # informative


def test_replicates_that_cannot_identify_the_law_are_skipped():
    groups = budget_groups(isoflop_points(budgets=(1e18, 1e19), sizes=4))
    weights = np.zeros((3, 8))
    weights[0, :4] = 2  # one budget only: N and D collinear
    weights[1, [0, 1, 4, 5]] = 1  # 4 distinct runs
    weights[2, [0, 1, 2, 4, 5]] = 1
    assert _identifiable(weights, groups).tolist() == [False, False, True]
    small = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [0.0, 0.5], "alpha": [0.5], "beta": [0.5]}
    fit = fit_chinchilla(isoflop_points(budgets=(1e18, 1e19), sizes=4), grid=small, n_bootstrap=30, seed=0)
    info = fit.bootstrap_info
    assert info["skipped"] > 0 and info["fitted"] + info["skipped"] == 30 == len(fit.bootstrap_params) + info["skipped"]


def test_chunking_bounds_memory_without_changing_the_replicates():
    points = noisy_isoflop_points(sizes=5)
    log_n, log_d, log_l = _log_arrays(points)
    grid = make_grid({"alpha": [0.5, 1.0], "beta": [0.5, 1.0]})
    theta = np.log([TRUE["A"], TRUE["B"], TRUE["E"]]).tolist() + [TRUE["alpha"], TRUE["beta"]]
    weights = resample_runs(points, 6, seed=0).weights(len(points))
    starts = _replicate_starts(theta, grid, 6, 40, seed=0)
    whole = _bootstrap(starts, log_n, log_d, log_l, weights, HUBER_DELTA)
    one_at_a_time = _bootstrap(starts, log_n, log_d, log_l, weights, HUBER_DELTA,
                               memory_bytes=41 * _bytes_per_problem(len(points)))
    assert np.allclose(whole, one_at_a_time, rtol=1e-9)
    # The per-start estimate the chunks are sized by bounds what the optimiser really allocates.
    for n, s in ((30, 600), (300, 100)):
        rng = np.random.default_rng(n)
        log_n, log_d = rng.uniform(16, 23, n), rng.uniform(18, 27, n)
        log_l = np.log(TRUE["E"] + TRUE["A"] * np.exp(-TRUE["alpha"] * log_n) + TRUE["B"] * np.exp(-TRUE["beta"] * log_d))
        tracemalloc.start()
        w = rng.integers(0, 3, (s, n)).astype(float)
        lbfgs_batch(make_grid()[rng.integers(0, 4500, s)], log_n[None], log_d[None], log_l[None], max_iter=300,
                    ftol=1e-7, weights=w)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= s * _bytes_per_problem(n), (n, peak / s, _bytes_per_problem(n))
