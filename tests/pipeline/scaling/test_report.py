"""The report: every fit in one strict-JSON file, and the plots written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scaling_synthetic import (
    TRUE,
    TRUE_A_EXPONENT,
    isoflop_points,
    synthetic_curves,
    synthetic_grid,
    true_loss,
)

from pipeline.scaling.approach1 import fit_approach1
from pipeline.scaling.approach2 import fit_isoflop, isoflop_minima
from pipeline.scaling.approach3 import ChinchillaFit
from pipeline.scaling.fit_inputs import ScalingPoint
from pipeline.scaling.plots import (
    frontier_figure,
    isoflop_figure,
    loss_vs_n_figure,
    plot_frontier,
    plot_isoflop,
    plot_loss_vs_n,
)
from pipeline.scaling.report import fit_all, summary, write_report

SMALL_GRID = {"a": [0.0, 10.0], "b": [0.0, 10.0], "e": [0.0, 1.0], "alpha": [0.5], "beta": [0.5]}

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
    assert len(report["bootstrap_params"]) == report["bootstrap"]["approach3"]["fitted"]
    assert report["bootstrap"]["approach3"]["fitted"] + report["bootstrap"]["approach3"]["skipped"] == 30
    assert (tmp_path / "points.csv").read_text().count("\n") == len(points) + 1
    # Approach 2: regression t-intervals and bootstrap intervals, by budget then run; predictions get both.
    a2 = report["approach2"]
    assert a2["a_bootstrap_interval"][0] < TRUE_A_EXPONENT < a2["a_bootstrap_interval"][1]
    assert a2["b_bootstrap_interval"][0] < 1 - TRUE_A_EXPONENT < a2["b_bootstrap_interval"][1]
    assert a2["a_interval"][0] < a2["a"] < a2["a_interval"][1]
    lo, hi = a2["predictions"][0]["bootstrap_intervals"]["N_opt"]
    assert lo <= a2["predictions"][0]["N_opt"] <= hi
    assert report["bootstrap"]["resample"] == "budget+run" and report["bootstrap"]["resample_note"] is None
    # Approach 1 from the runs' final points (one-point curves): the compute frontier.
    assert report["approach1"]["source"] == "final points (one-point curves)"
    assert report["approach1"]["a"] == pytest.approx(TRUE_A_EXPONENT, rel=0.03)
    assert report["diagnostics"] == [] and report["data_constrained"] == {"skipped": "no run repeats data"}
    text = summary(report)
    assert "approach 3: E=" in text and "approach 1: a=" in text and "warning" not in text
    a_lo, a_hi = a2["a_bootstrap_interval"]
    assert f"approach 2: a={a2['a']:.3f} [{a_lo:.3f}, {a_hi:.3f}]" in text and "bootstrap by budget+run" in text


def test_fit_all_is_strict_json_and_reports_unfittable_parts():
    # An N x D grid has no IsoFLOP budgets (approach 2 cannot run); the rest still fits.
    report = fit_all(synthetic_grid(seed=1), [1e22], n_bootstrap=10, grid=SMALL_GRID)
    json.dumps(report, allow_nan=False)
    assert "error" in report["approach2"]
    # No IsoFLOP budgets to resample: by run, and the report says why.
    assert report["bootstrap"]["resample"] == "run" and "N x D grid" in report["bootstrap"]["resample_note"]
    assert "bootstrap: the runs do not share compute budgets" in summary(report)
    assert report["approach3"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.02)
    assert set(report["approach3"]["intervals"]) == {"E", "A", "B", "alpha", "beta", "a", "b", "G"}
    assert report["predictions"][0]["C"] == 1e22
    assert report["kaplan"]["alpha_N"] > 0
    too_few = fit_all(synthetic_grid(seed=1)[:3], [1e22], n_bootstrap=0)
    assert "at least 5 runs" in too_few["approach3"]["error"]
    assert "error" in too_few["approach2"] and "error" in too_few["approach1"]
    assert "approach 1: approach 1 needs" in summary(too_few)
    json.dumps(too_few, allow_nan=False)


def test_approach_1_in_the_report_from_training_curves(tmp_path):
    curves = synthetic_curves()
    points = [ScalingPoint(c.N, c.D[-1], c.loss[-1]) for c in curves]  # the runs' final points
    report = fit_all(points, [1e22], n_bootstrap=0, grid=SMALL_GRID, curves=curves)
    a1 = report["approach1"]
    assert a1["source"] == "training curves" and a1["a"] == pytest.approx(TRUE_A_EXPONENT, rel=0.02)
    assert a1["a_interval"][0] < a1["a"] < a1["a_interval"][1] and a1["b"] == pytest.approx(1 - a1["a"])
    assert a1["n_censored"] > 0 and len(a1["runs"]) == len(a1["N_opt"]) == len(a1["budgets"])
    assert a1["predictions"][0]["C"] == 1e22 and a1["predictions"][0]["N_opt"] > 0
    assert "approach 1: a=" in summary(report) and "envelope of training curves" in summary(report)
    json.dumps(report, allow_nan=False)
    written = write_report(isoflop_points(budgets=(1e18, 1e19), sizes=3), tmp_path, [1e21], n_bootstrap=0,
                           curves=curves)
    assert written["approach1"]["source"] == "training curves" and "frontier.png" in written["plots"]


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


def many_budgets(n=10):
    return [p for C in np.logspace(17, 21.5, n) for p in isoflop_points(budgets=(C,), sizes=5)]


def test_many_groups_get_a_colour_bar_instead_of_a_legend():
    import matplotlib.pyplot as plt

    points = many_budgets(10)
    fig = isoflop_figure(points, isoflop_minima(points))
    assert len(fig.axes) == 2 and fig.axes[0].get_legend() is None  # the plot and its colour bar
    assert "compute" in fig.axes[1].get_ylabel()
    few = isoflop_points()
    fig_few = isoflop_figure(few, isoflop_minima(few))
    assert len(fig_few.axes) == 1 and fig_few.axes[0].get_legend() is not None
    assert len(fig_few.axes[0].get_legend().get_texts()) == 4
    # Loss vs N on an N x D grid with 10 token counts: a colour bar over D.
    grid = [ScalingPoint(N, D, true_loss(N, D)) for N in np.logspace(7, 10, 4) for D in np.logspace(8, 12, 10)]
    fig_grid = loss_vs_n_figure(grid, None)
    assert len(fig_grid.axes) == 2 and fig_grid.axes[0].get_legend() is None
    assert "tokens" in fig_grid.axes[1].get_ylabel()
    fig_iso = loss_vs_n_figure(points, ChinchillaFit(**TRUE, objective=0.0, n_points=50))
    assert len(fig_iso.axes) == 2 and fig_iso.axes[0].get_legend() is None
    # The colours follow log C: the cheapest and dearest budgets get the ends of the scale.
    scatter_colours = [tuple(c.get_facecolor()[0]) for c in fig.axes[0].collections]
    assert scatter_colours[0] != scatter_colours[-1]
    for f in (fig, fig_few, fig_grid, fig_iso):
        plt.close(f)


def test_frontier_plot_draws_approach_1_when_it_fitted(tmp_path):
    import matplotlib.pyplot as plt

    envelope = fit_approach1(synthetic_curves())
    fig = frontier_figure(None, None, [1e22], envelope=envelope)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("approach 1: N ∝ C^") for label in labels)
    plt.close(fig)
    fig = frontier_figure(ChinchillaFit(**TRUE, objective=0.0, n_points=30), None, [1e22])
    assert not any("approach 1" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    plt.close(fig)
    path = plot_frontier(None, None, [], tmp_path / "f.png", envelope=envelope)
    assert path.read_bytes().startswith(PNG_MAGIC)
