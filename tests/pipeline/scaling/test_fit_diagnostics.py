"""The edge diagnostic: an IsoFLOP budget whose sizes do not bracket the optimum is named, with what to do."""

from __future__ import annotations

import logging

import numpy as np
from scaling_synthetic import isoflop_points

from pipeline.scaling.approach2 import edge_diagnostics
from pipeline.scaling.fit_inputs import ScalingPoint
from pipeline.scaling.report import fit_all, summary

SMALL_GRID = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [0.0, 0.5], "alpha": [0.5], "beta": [0.5]}


def test_silent_when_the_sizes_bracket_the_optimum():
    assert edge_diagnostics(isoflop_points()) == []
    assert edge_diagnostics(isoflop_points(sizes=5)) == []


def test_sizes_above_or_below_the_optimum_are_named_per_budget():
    # Sizes centred on (C/6)^0.7: far above the optimum, the smallest size has the lowest loss.
    above = edge_diagnostics(isoflop_points(budgets=(1e18, 1e20), sizes=5, centre_exponent=0.7))
    assert len(above) == 2
    assert above[0].startswith("budget 1e+18 FLOPs: the lowest loss is at the smallest size (N=")
    assert above[0].endswith("add smaller sizes") and above[1].startswith("budget 1e+20 FLOPs")
    below = edge_diagnostics(isoflop_points(budgets=(3e19,), sizes=5, centre_exponent=0.3))
    assert len(below) == 1 and "at the largest size" in below[0] and below[0].endswith("add larger sizes")
    # Only the off-centre budget is named.
    mixed = isoflop_points(budgets=(1e18,)) + isoflop_points(budgets=(1e20,), sizes=5, centre_exponent=0.7)
    assert [w.split(":")[0] for w in edge_diagnostics(mixed)] == ["budget 1e+20 FLOPs"]


def test_a_vertex_outside_the_sizes_or_a_parabola_opening_downwards_is_named():
    ns = [1e7, 2e7, 4e7, 8e7, 1.6e8]

    def budget(losses):
        return [ScalingPoint(n, 1e19 / (6 * n), loss, C=1e19) for n, loss in zip(ns, losses, strict=True)]

    # Lowest loss inside (N=2e7), but the parabola through the points bottoms out far below the sizes.
    (outside,) = edge_diagnostics(budget([2.5, 2.3, 2.6, 2.62, 2.58]))
    assert "the parabola's minimum" in outside and "below the smallest size (N=1e+07)" in outside
    (flat,) = edge_diagnostics(budget([2.0, 1.95, 2.2, 2.3, 2.3]))
    assert "opens downwards" in flat and "N=2e+07" in flat
    # Fewer than 3 sizes: no parabola, nothing to say.
    assert edge_diagnostics(budget([2.5, 2.3, 2.6, 2.62, 2.58])[:2]) == []


def test_the_report_lists_logs_and_prints_them(caplog):
    points = isoflop_points(budgets=(1e18,)) + isoflop_points(budgets=(1e19, 1e20), sizes=5, centre_exponent=0.7)
    with caplog.at_level(logging.WARNING, logger="pipeline.scaling.report"):
        report = fit_all(points, [1e21], n_bootstrap=0, grid=SMALL_GRID)
    assert len(report["diagnostics"]) == 2 and all("add smaller sizes" in w for w in report["diagnostics"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == report["diagnostics"]
    text = summary(report)
    for warning in report["diagnostics"]:
        assert f"warning: {warning}" in text
    assert fit_all(isoflop_points(), [1e21], n_bootstrap=0, grid=SMALL_GRID)["diagnostics"] == []
    assert "warning" not in summary(fit_all(isoflop_points(), [1e21], n_bootstrap=0, grid=SMALL_GRID))
    assert np.isfinite(report["approach2"].get("a", 0.0)) or "error" in report["approach2"]
