"""Approach 1: the lower envelope of training curves recovers the allocation exponent of a known law."""

from __future__ import annotations

import numpy as np
import pytest
from scaling_synthetic import TRUE_A_EXPONENT, isoflop_points, synthetic_curves, true_loss, true_n_opt

from pipeline.scaling.approach1 import fit_approach1, lower_envelope
from pipeline.scaling.fit_inputs import TrainingCurve, curves_from_points
from pipeline.scaling.kaplan import compute_frontier


def test_approach_1_recovers_the_exponent_from_training_curves():
    fit = fit_approach1(synthetic_curves())
    assert fit.a == pytest.approx(TRUE_A_EXPONENT, rel=0.02)
    assert fit.b == pytest.approx(1 - TRUE_A_EXPONENT, rel=0.02)
    lo, hi = fit.n_law.exponent_interval
    assert lo < fit.a < hi
    assert len(set(fit.n_opt)) >= 5  # the envelope steps through several sizes
    # Each envelope point is within one size step (10^0.25) of the true optimum at its compute.
    for C, n in zip(fit.budgets, fit.n_opt, strict=True):
        assert abs(np.log10(n / true_n_opt(C))) <= 0.25, (C, n)
    for C, n, d, loss in zip(fit.budgets, fit.n_opt, fit.d_opt, fit.loss, strict=True):
        # Interpolated linearly in ln D between logged steps 10^0.1 apart: close to the law, not on it.
        assert 6 * n * d == pytest.approx(C) and loss == pytest.approx(true_loss(n, d), rel=1e-3)
    prediction = fit.compute_optimal(1e22)
    assert prediction["N_opt"] == pytest.approx(true_n_opt(1e22), rel=0.15)


def test_envelope_points_not_bracketed_by_other_sizes_are_dropped():
    """Every curve spans D = 1e8 .. 1e12. At the bottom of the compute range the smallest size wins because
    nothing smaller was trained (N flat in C); at the top only the largest models reach C, so the envelope is
    the smallest size whose curve still reaches C, near its last step (N ∝ C^1). Neither is the optimum; both
    must be dropped."""
    envelope = lower_envelope(synthetic_curves())
    bottom = [e for e in envelope if e.curve.N == 1e7]
    top = [e for e in envelope if e.C > 6 * 3e9 * 1e12]
    assert bottom and top and not any(e.bracketed for e in bottom + top)
    assert all(1e12 / 10**0.25 <= e.C / (6 * e.curve.N) <= 1e12 * (1 + 1e-9) for e in top)  # within a size step
    assert all(e.bracketed for e in envelope if 2e18 < e.C < 5e20)  # the middle is kept
    fit = fit_approach1(synthetic_curves())
    assert fit.n_censored == sum(not e.bracketed for e in envelope) >= len(bottom) + len(top)
    assert min(fit.n_opt) > 1e7 and max(fit.budgets) < 6 * 3e9 * 1e12


def test_curves_are_interpolated_not_extrapolated():
    # Two short curves that do not overlap in compute, and a long one between: at no C may a curve count
    # outside its own logged range, and a run that ended counts with its final loss at its own compute.
    short = TrainingCurve("small", 1e7, [1e9, 2e9], [3.0, 2.9])
    long = TrainingCurve("mid", 1e8, [1e8, 1e10], [3.5, 2.5])
    envelope = lower_envelope([short, long], n_compute=50)
    for e in envelope:
        d = e.C / (6 * e.curve.N)
        assert min(e.curve.D) * (1 - 1e-9) <= d <= max(e.curve.D) * (1 + 1e-9)
    small = [e for e in envelope if e.curve.run == "small"]
    assert small and all(e.loss >= 2.9 - 1e-12 for e in small)


def test_one_point_curves_give_the_compute_frontier():
    points = isoflop_points()
    envelope = lower_envelope(curves_from_points(points))
    frontier = compute_frontier(points)
    assert [(e.curve.N, e.loss) for e in envelope] == [(p.N, p.loss) for p in frontier]
    fit = fit_approach1(curves_from_points(points))
    # The synthetic sizes sit at (C / 6)^0.45 times fixed factors, so the best size per budget does too.
    assert fit.a == pytest.approx(0.45, rel=1e-6)
    assert fit.n_censored == 0


def test_approach_1_explains_what_it_cannot_fit():
    with pytest.raises(ValueError, match="at least 2 runs"):
        fit_approach1(synthetic_curves(sizes=[1e8]))
    # Two sizes: neither is bracketed by the other.
    with pytest.raises(ValueError, match="both sides of the optimum"):
        fit_approach1(synthetic_curves(sizes=[1e8, 1e9]))
    with pytest.raises(ValueError, match="final points only.*IsoFLOP"):
        fit_approach1(curves_from_points(isoflop_points(budgets=(1e18, 1e19), sizes=3)[::2]))
    with pytest.raises(ValueError, match="equal, non-zero length"):
        fit_approach1([TrainingCurve("x", 1e8, [1e9], [3.0, 2.0]), TrainingCurve("y", 1e9, [1e9], [3.0])])
