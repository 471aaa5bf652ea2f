"""Small statistics the screening needs, in torch float64: a gamma fit, its tail, robust z-scores.

The gamma fit is maximum likelihood for the shape (Newton on
``log k - digamma(k) = log(mean) - mean(log x)``, started from the closed-form
approximation of Minka, 2002) with the scale ``mean / k``; values are shifted by
a location below their minimum first, so non-positive margins are allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal sample, in standard deviations


@dataclass(frozen=True)
class GammaFit:
    shape: float
    scale: float
    loc: float

    def sf(self, value: float) -> float:
        """P(X > value) for X = loc + Gamma(shape, scale)."""
        z = (value - self.loc) / self.scale
        if z <= 0:
            return 1.0
        return float(torch.special.gammaincc(torch.tensor(self.shape, dtype=torch.float64),
                                             torch.tensor(z, dtype=torch.float64)))

    def to_dict(self) -> dict[str, float]:
        return {"shape": self.shape, "scale": self.scale, "loc": self.loc}


def fit_gamma(values: torch.Tensor, *, iterations: int = 50) -> GammaFit:
    """Fit a gamma distribution to ``values`` (at least two, not all equal)."""
    x = values.detach().to(torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError("a gamma fit needs at least two values")
    spread = float(x.std())
    if not math.isfinite(spread) or spread <= 0:
        spread = max(abs(float(x.mean())), 1.0) * 1e-3
    # a location just below the smallest value keeps every shifted value positive
    loc = min(0.0, float(x.min()) - 0.5 * spread)
    y = x - loc
    mean = float(y.mean())
    s = math.log(mean) - float(torch.log(y).mean())
    s = max(s, 1e-12)
    k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(iterations):
        kt = torch.tensor(k, dtype=torch.float64)
        f = math.log(k) - float(torch.special.digamma(kt)) - s
        df = 1 / k - float(torch.special.polygamma(1, kt))
        step = f / df
        k_new = k - step
        if k_new <= 0:
            k_new = k / 2
        if abs(k_new - k) < 1e-10 * k:
            k = k_new
            break
        k = k_new
    return GammaFit(shape=k, scale=mean / k, loc=loc)


def max_order_pvalue(fit: GammaFit, value: float, count: int) -> float:
    """P(the largest of ``count`` draws from ``fit`` exceeds ``value``): ``1 - (1 - sf)^count``."""
    tail = fit.sf(value)
    # log1p form keeps precision when the tail is tiny
    return float(-math.expm1(count * math.log1p(-tail))) if tail < 1.0 else 1.0


def robust_z(value: float, others: torch.Tensor) -> float:
    """(value - median) / (1.4826 * MAD) of ``others``; the MAD is floored to keep it finite."""
    x = others.detach().to(torch.float64).flatten()
    median = float(x.median())
    mad = float((x - median).abs().median()) * MAD_TO_SIGMA
    floor = 1e-6 * max(abs(median), 1.0)
    return (value - median) / max(mad, floor)
