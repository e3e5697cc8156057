"""Power laws y = k x^p fitted in log-log space with t-intervals (PowerLaw, fit_power_law), and the
allocation N_opt ∝ C^a, D_opt ∝ C^b as two of them (_PowerLawAllocation: approaches 1 and 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class PowerLaw:
    """y = coefficient * x^exponent, fitted by least squares in log-log space. exponent_interval is the
    t-interval of the slope at the fit's confidence level (None with only 2 points: no residual to judge)."""

    exponent: float
    coefficient: float
    exponent_interval: tuple[float, float] | None
    n_points: int
    confidence: float = 0.95
    # For intervals of predictions: residual standard deviation, mean and spread of log x.
    residual_std: float = 0.0
    log_x_mean: float = 0.0
    log_x_sxx: float = 0.0

    def __call__(self, x):
        return self.coefficient * np.power(x, self.exponent)

    def prediction_interval(self, x: float) -> tuple[float, float] | None:
        """Confidence interval of the fitted line (the mean of log y) at x, back in y units."""
        if self.n_points <= 2 or self.log_x_sxx <= 0:
            return None
        t = stats.t.ppf((1 + self.confidence) / 2, self.n_points - 2)
        se = self.residual_std * np.sqrt(1 / self.n_points + (np.log(x) - self.log_x_mean) ** 2 / self.log_x_sxx)
        centre = np.log(self(x))
        return float(np.exp(centre - t * se)), float(np.exp(centre + t * se))


def fit_power_law(x, y, confidence: float = 0.95) -> PowerLaw:
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError(f"a power law needs at least 2 distinct x values, got {len(set(lx.tolist()))}")
    res = stats.linregress(lx, ly)
    interval, resid_std = None, 0.0
    if len(lx) > 2:
        t = stats.t.ppf((1 + confidence) / 2, len(lx) - 2)
        interval = (float(res.slope - t * res.stderr), float(res.slope + t * res.stderr))
        resid = ly - (res.intercept + res.slope * lx)
        resid_std = float(np.sqrt((resid**2).sum() / (len(lx) - 2)))
    return PowerLaw(float(res.slope), float(np.exp(res.intercept)), interval, len(lx), confidence, resid_std,
                    float(lx.mean()), float(((lx - lx.mean()) ** 2).sum()))


class _PowerLawAllocation:
    """N_opt ∝ C^a and D_opt ∝ C^b as two fitted power laws (n_law, d_law): approaches 1 and 2."""

    n_law: PowerLaw
    d_law: PowerLaw

    @property
    def a(self) -> float:
        return self.n_law.exponent

    @property
    def b(self) -> float:
        return self.d_law.exponent

    def law_prediction(self, C: float) -> dict:
        """N_opt and D_opt at C from the two laws, with the regression's intervals (None with < 3 points)."""
        return {"C": float(C), "N_opt": float(self.n_law(C)), "D_opt": float(self.d_law(C)),
                "intervals": {"N_opt": self.n_law.prediction_interval(C), "D_opt": self.d_law.prediction_interval(C)}}
