"""The report: every fit in one strict-JSON file, and the plots written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scaling_synthetic import TRUE, TRUE_A_EXPONENT, isoflop_points, synthetic_grid

from pipeline.scaling.fit import ChinchillaFit, fit_isoflop, isoflop_minima
from pipeline.scaling.plots import plot_frontier, plot_isoflop, plot_loss_vs_n
from pipeline.scaling.report import fit_all, summary, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def noisy_isoflop_points(seed=0, noise=0.001):
    rng = np.random.default_rng(seed)
    points = isoflop_points(sizes=7)
    for p in points:
        p.loss *= float(np.exp(rng.normal(0, noise)))
    return points


def test_write_report_on_isoflop_runs(tmp_path):
    points = noisy_isoflop_points()
    report = write_report(points, tmp_path, [1e21, 5.76e23], n_bootstrap=30)
    on_disk = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert on_disk == report
    assert set(report["plots"]) == {"loss_vs_n.png", "isoflop.png", "frontier.png"}
    for name in report["plots"]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    # Approaches 2 and 3 agree on the allocation exponent, and both find the planted one.
    assert report["approach3"]["a"] == pytest.approx(TRUE_A_EXPONENT, rel=0.03)
    assert report["approach2"]["a"] == pytest.approx(TRUE_A_EXPONENT, rel=0.03)
    big = report["predictions"][1]
    assert big["C"] == 5.76e23 and big["intervals"]["N_opt"][0] <= big["N_opt"] <= big["intervals"]["N_opt"][1]
    assert len(report["bootstrap_params"]) == 30
    assert (tmp_path / "points.csv").read_text().count("\n") == len(points) + 1
    assert "approach 3: E=" in summary(report) and "approach 2: a=" in summary(report)


def test_fit_all_is_strict_json_and_reports_unfittable_parts():
    # An N x D grid has no IsoFLOP budgets (approach 2 cannot run); the rest still fits.
    report = fit_all(synthetic_grid(seed=1), [1e22], n_bootstrap=10,
                     grid={"a": [0.0, 10.0], "b": [0.0, 10.0], "e": [0.0, 1.0], "alpha": [0.5], "beta": [0.5]})
    json.dumps(report, allow_nan=False)
    assert "error" in report["approach2"]
    assert report["approach3"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.02)
    assert set(report["approach3"]["intervals"]) == {"E", "A", "B", "alpha", "beta", "a", "b", "G"}
    assert report["predictions"][0]["C"] == 1e22
    assert report["kaplan"]["alpha_N"] > 0
    too_few = fit_all(synthetic_grid(seed=1)[:3], [1e22], n_bootstrap=0)
    assert "at least 5 runs" in too_few["approach3"]["error"]
    assert "error" in too_few["approach2"]
    json.dumps(too_few, allow_nan=False)


def test_plots_take_fits_and_paths(tmp_path):
    grid_points = synthetic_grid(seed=1)
    fit = ChinchillaFit(**TRUE, objective=0.0, n_points=30)
    assert plot_loss_vs_n(grid_points, fit, tmp_path / "grid.png").stat().st_size > 5000
    iso_points = noisy_isoflop_points()
    minima = isoflop_minima(iso_points)
    assert plot_isoflop(iso_points, minima, tmp_path / "iso.png").stat().st_size > 5000
    iso = fit_isoflop(iso_points)
    assert plot_frontier(fit, iso, [1e23], tmp_path / "frontier.png").stat().st_size > 5000
    assert plot_frontier(fit, None, [], tmp_path / "f2.png", points=grid_points).stat().st_size > 5000
    with pytest.raises(ValueError, match="compute range"):
        plot_frontier(fit, None, [], tmp_path / "f3.png")
