"""The data-constrained law (Muennighoff et al. 2023): effective data, and R*_D recovered from runs that
repeat their data."""

from __future__ import annotations

import numpy as np
import pytest
from scaling_synthetic import TRUE, TRUE_R_STAR_D, isoflop_points, repeated_data_points

from pipeline.scaling.data_constrained import effective_data, fit_data_constrained
from pipeline.scaling.fit_inputs import load_points_csv, write_points_csv
from pipeline.scaling.report import fit_all, summary

SMALL_GRID = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [0.0, 0.5], "alpha": [0.5], "beta": [0.5]}


def test_effective_data():
    D = np.array([1e9, 4e9, 4e9, 1e12, 5e8])
    epochs = np.array([1.0, 4.0, 4.0, 100.0, np.nan])
    assert effective_data(D[[0, 4]], epochs[[0, 4]], 15.0) == pytest.approx(D[[0, 4]])  # no repeats: D' = D
    # R*_D large: a repeated token is worth a fresh one; small: worth nothing (D' = unique tokens).
    assert effective_data(4e9, 4.0, 1e9) == pytest.approx(4e9, rel=1e-6)
    assert effective_data(4e9, 4.0, 1e-3) == pytest.approx(1e9, rel=2e-3)
    # 3 repeats at R*_D = 15: U (1 + 15 (1 - e^(-3/15))).
    assert effective_data(4e9, 4.0, 15.0) == pytest.approx(1e9 * (1 + 15 * (1 - np.exp(-0.2))))
    # With U = 1e9 unique tokens, more epochs always add something, less each time, up to U (1 + R*_D).
    epochs = np.array([2.0, 10.0, 30.0, 100.0, 1000.0])
    curve = effective_data(1e9 * epochs, epochs, 15.0)
    per_epoch = np.diff(curve) / np.diff(epochs)
    assert np.all(per_epoch > 0) and np.all(np.diff(per_epoch) < 0)
    assert curve[-1] == pytest.approx(1e9 * 16) and curve[-2] < 1e9 * 16


def test_recovers_r_star_d_from_repeated_runs():
    fit = fit_data_constrained(repeated_data_points(epochs=(1, 3, 8, 25, 60)))
    assert fit.R_star_D == pytest.approx(TRUE_R_STAR_D, rel=0.1)
    assert not fit.R_star_D_at_bound
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.03) and fit.beta == pytest.approx(TRUE["beta"], rel=0.03)
    assert pytest.approx(TRUE["E"], rel=0.02) == fit.E
    assert fit.n_points == 50 and fit.n_repeated == 40
    # The same tokens seen as 25 passes over fewer unique ones are worth less than fresh ones.
    assert fit.loss(1e8, 3e9 * 25, 25.0) > fit.loss(1e8, 3e9 * 25, 1.0)
    assert fit.loss(1e8, 3e10, 1.0) == pytest.approx(fit.E + fit.A / 1e8**fit.alpha + fit.B / 3e10**fit.beta)


def test_needs_repeated_runs_and_reports_skipped_without_them():
    with pytest.raises(ValueError, match="no run repeats data"):
        fit_data_constrained(isoflop_points())
    report = fit_all(isoflop_points(), [1e21], n_bootstrap=0, grid=SMALL_GRID)
    assert report["data_constrained"] == {"skipped": "no run repeats data"}
    assert "data-constrained: no run repeats data" in summary(report)
    with pytest.raises(ValueError, match="at least 6 runs"):
        fit_data_constrained(repeated_data_points()[:5])


def test_report_fits_it_when_runs_repeat_data(tmp_path):
    points = repeated_data_points(epochs=(1, 4, 16, 64))
    write_points_csv(points, tmp_path / "runs.csv")
    loaded = load_points_csv(tmp_path / "runs.csv")
    assert [p.epochs for p in loaded] == [p.epochs for p in points]
    report = fit_all(loaded, [1e21], n_bootstrap=0, grid=SMALL_GRID)
    dc = report["data_constrained"]
    assert set(dc) >= {"E", "A", "B", "alpha", "beta", "R_star_D", "objective", "n_points"}
    assert dc["R_star_D"] == pytest.approx(TRUE_R_STAR_D, rel=0.2) and dc["n_repeated"] == 30
    assert "data-constrained: R*_D=" in summary(report)
    assert all(p["epochs"] == q.epochs for p, q in zip(report["points"], points, strict=True))
