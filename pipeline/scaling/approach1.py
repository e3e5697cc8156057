"""Chinchilla approach 1 (Hoffmann et al. 2022): the lower envelope of the training curves gives, per compute,
the model size and tokens with the lowest loss; N_opt ∝ C^a and D_opt ∝ C^b are fitted through its points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.scaling.fit_inputs import TrainingCurve
from pipeline.scaling.power_law import PowerLaw, _PowerLawAllocation, fit_power_law


@dataclass
class EnvelopeFit(_PowerLawAllocation):
    """Approach 1: the lower envelope of the training curves; then N_opt ∝ C^a and D_opt ∝ C^b over its points.

    budgets[i] is the compute (6 N D) at which run runs[i] (N = n_opt[i], D = d_opt[i]) gave the envelope's
    loss[i]; n_censored envelope points were dropped as not bracketed by other sizes (see fit_approach1)."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss: list[float]
    runs: list[str]
    n_law: PowerLaw
    d_law: PowerLaw
    n_censored: int = 0

    def compute_optimal(self, C: float) -> dict:
        return self.law_prediction(C)


def _prepared_curves(curves: list[TrainingCurve]) -> list[tuple[TrainingCurve, np.ndarray, np.ndarray]]:
    """(curve, ln C at its points in increasing order, losses), with the inputs checked."""
    out = []
    for c in curves:
        d, loss = np.asarray(c.D, float), np.asarray(c.loss, float)
        if d.shape != loss.shape or d.ndim != 1 or d.size == 0:
            raise ValueError(f"curve {c.run!r}: D and loss must be lists of equal, non-zero length")
        if not (c.N > 0 and np.all(d > 0) and np.all(loss > 0) and np.all(np.isfinite(loss))):
            raise ValueError(f"curve {c.run!r}: N, D and loss must be positive and finite")
        order = np.argsort(d)
        out.append((c, np.log(6.0 * c.N * d[order]), loss[order]))
    return out


@dataclass
class EnvelopePoint:
    """The lowest loss at compute C (6 N D of the run that gave it, at its D). bracketed: runs of a smaller and
    of a larger size reach C too (within 5%) and lost, so the optimum at C lies between them."""

    C: float
    curve: TrainingCurve
    loss: float
    bracketed: bool


def lower_envelope(curves: list[TrainingCurve], n_compute: int = 200, rel_tol: float = 0.05) -> list[EnvelopePoint]:
    """The envelope's points, cheapest first: at n_compute log-spaced C, from where 2 runs have started to
    where the last ends (plus the computes of one-point curves, so none is stepped over), the lowest loss
    over the runs. A run that covers C counts with its loss interpolated linearly in ln D (never
    extrapolated); a run that ended before C counts with its final loss, recorded at its own compute: that
    run is a way to spend at most C. So the envelope over one-point curves is the compute frontier."""
    prepared = _prepared_curves(curves)
    if len(prepared) < 2:
        raise ValueError(f"approach 1 needs the curves of at least 2 runs, got {len(prepared)}")
    lo = sorted(lc[0] for _, lc, _ in prepared)[1]
    hi = max(lc[-1] for _, lc, _ in prepared)
    singles = [lc[0] for _, lc, _ in prepared if len(lc) == 1 and lo <= lc[0] <= hi]
    x = np.unique(np.concatenate([np.linspace(lo, hi, n_compute), singles]))
    values, own = np.full((len(prepared), len(x)), np.inf), np.tile(x, (len(prepared), 1))
    for i, (_, lc, loss) in enumerate(prepared):
        inside, after = (x >= lc[0]) & (x <= lc[-1]), x > lc[-1]
        values[i, inside] = np.interp(x[inside], lc, loss)
        values[i, after], own[i, after] = loss[-1], lc[-1]
    winner = values.argmin(axis=0)
    chosen = sorted({(int(i), float(own[i, j])): j for j, i in enumerate(winner)}.items(), key=lambda kv: kv[0][1])
    tol = np.log1p(rel_tol)
    out = []
    for (i, x_own), j in chosen:
        present = [c.N for c, lc, _ in prepared if lc[0] - tol <= x_own <= lc[-1] + tol]
        n = prepared[i][0].N
        out.append(EnvelopePoint(float(np.exp(x_own)), prepared[i][0], float(values[i, j]),
                                 min(present) < n < max(present)))
    return out


def fit_approach1(curves: list[TrainingCurve], confidence: float = 0.95, n_compute: int = 200) -> EnvelopeFit:
    """Approach 1 (Hoffmann et al. 2022): the lower envelope of the training curves (lower_envelope) gives,
    per compute C, the model size N and tokens D that reached the lowest loss; N_opt ∝ C^a and D_opt ∝ C^b
    are fitted through those points. Only bracketed points count: where no smaller (or no larger) size
    reaches C, the envelope's N is the smallest (largest) available, a bound on the optimum rather than the
    optimum (at the top of the range only the largest models have trained long enough, which would bend
    the slope towards 1), so they are dropped and counted in n_censored.

    The N on the envelope only takes the sizes trained, so it is a staircase in C; the slope needs at least
    2 distinct sizes on it, and the t-intervals of a and b treat the envelope points, which share sizes, as
    independent: read them as lower bounds of the uncertainty."""
    envelope = lower_envelope(curves, n_compute)
    kept = [e for e in envelope if e.bracketed]
    if len({e.curve.N for e in kept}) < 2:
        finals = all(len(c.D) == 1 for c in curves)
        raise ValueError(
            "approach 1 needs the lower envelope to pass through at least 2 model sizes that runs of a smaller "
            f"and a larger size bracket at the same compute, found {len({e.curve.N for e in kept})} "
            f"(of {len({c.N for c in curves})} sizes): "
            + ("with final points only, that takes runs of several sizes per compute budget (IsoFLOP); or pass "
               "the runs' training curves" if finals else
               "train sizes on both sides of the optimum, for long enough that their curves overlap in compute")
        )
    budgets = [e.C for e in kept]
    n_opt = [e.curve.N for e in kept]
    d_opt = [C / (6 * n) for C, n in zip(budgets, n_opt, strict=True)]
    return EnvelopeFit(budgets, n_opt, d_opt, [e.loss for e in kept], [e.curve.run for e in kept],
                       fit_power_law(budgets, n_opt, confidence), fit_power_law(budgets, d_opt, confidence),
                       n_censored=len(envelope) - len(kept))
