"""Each sample's NLL at any temperature, from a record of fixed size, and the exact best temperature.

With d_c = z_c - max z (<= 0) and the margin g = max z - z_y, a sample's NLL at inverse temperature b is

    NLL(b) = b g + log(1 + sum_{i=2..4} exp(b d_(i)) + R(b)),   R(b) = sum_{c outside the top 4} exp(b d_c)

(d_(i) the i-th largest gap; the largest is 0). The bend of a sample's curve comes from its few
leading classes: their terms are kept exactly (``top_gaps``, 3 float32s), and only log R, a smooth
sum over the many remaining classes, is interpolated between the grid points where the engine
computed it (``log_rest``): a cubic in b through the 4 grid points nearest b (local Lagrange, so
a value at one grid point moves the curve only near it). The margin is ``nll + log(confidence)``
(``confidence = exp(-log S)``), so nothing else is stored.

The curve of the mean over samples, ``mean_nll``, is minimised over [b_min, b_max] in float64 by
golden-section search in log b inside the bracket of the best grid point; T* = 1 / b*. Where the
minimum is at an end of the grid the optimum lies beyond it, and ``optimum`` says on which side.
The paired tests of compare evaluate the same ``sample_nll`` at T*, so the mean of their per-sample
values is the reported calibrated NLL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.records import Records

F64 = npt.NDArray[np.float64]

# Golden-section search stops when the bracket is this narrow, relative, in b (T* to 1e-6).
B_TOLERANCE = 1e-6
_GOLD = (math.sqrt(5.0) - 1.0) / 2.0
# Inside the grid, beyond its highest temperature (b < b_min), beyond its lowest (b > b_max).
INSIDE, ABOVE, BELOW = 0, 1, -1


def lagrange_stencil(grid: F64, b: float) -> tuple[int, F64]:
    """(first index, weights) of the cubic through the 4 grid points nearest ``b`` (fewer on a grid of
    fewer points): log R(b) = sum_k w_k log_rest[:, first + k]."""
    g = len(grid)
    width = min(4, g)
    i = int(np.clip(np.searchsorted(grid, b) - 1, 0, max(g - 2, 0)))
    lo = int(np.clip(i - 1, 0, g - width))
    xs = grid[lo : lo + width]
    w = np.ones(width)
    for j in range(width):
        for k in range(width):
            if k != j:
                w[j] *= (b - xs[k]) / (xs[j] - xs[k])
    return lo, w


def margins(records: Records) -> F64:
    """max z - z_y of every sample: NLL - log S with log S = -log(confidence)."""
    return records.nll.astype(np.float64) + np.log(records.confidence.astype(np.float64))


def sample_nll(records: Records, b: float, margin: F64 | None = None) -> F64:
    """[n] NLL of every sample at inverse temperature ``b`` (within the grid), float64."""
    grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
    g = margins(records) if margin is None else margin
    lo, w = lagrange_stencil(grid, b)
    log_rest = records.log_rest[:, lo : lo + len(w)].astype(np.float64) @ w
    with np.errstate(under="ignore"):
        total = 1.0 + np.exp(b * records.top_gaps.astype(np.float64)).sum(axis=1) + np.exp(log_rest)
    return b * g + np.log(total)


def mean_nll(records: Records, b: float, margin: F64 | None = None) -> float:
    return float(np.mean(sample_nll(records, b, margin))) if len(records) else math.nan


@dataclass(frozen=True)
class Optimum:
    """b* (the inverse of T*), the mean NLL there, and where it lies against the grid."""

    inverse_temperature: float
    nll: float
    side: int  # INSIDE, ABOVE (T* > the grid's highest T) or BELOW (T* < its lowest)


def optimum(records: Records, grid_means: F64) -> Optimum:
    """The minimum of ``mean_nll`` over [b_min, b_max]; ``grid_means`` its values at the grid points."""
    grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
    j = int(np.argmin(grid_means))
    if len(grid) < 2:
        return Optimum(float(grid[j]), float(grid_means[j]), INSIDE)
    margin = margins(records)

    def f(log_b: float) -> float:
        return mean_nll(records, math.exp(log_b), margin)

    lo, hi = math.log(grid[max(j - 1, 0)]), math.log(grid[min(j + 1, len(grid) - 1)])
    best_x, best_f = math.log(grid[j]), float(grid_means[j])
    c, d = hi - _GOLD * (hi - lo), lo + _GOLD * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > B_TOLERANCE:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLD * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLD * (hi - lo)
            fd = f(d)
    for x, v in ((c, fc), (d, fd)):
        if v < best_f:
            best_x, best_f = x, v
    b = math.exp(best_x)
    side = INSIDE
    if j == 0 and b <= grid[0] * (1 + 2 * B_TOLERANCE):
        b, best_f, side = float(grid[0]), float(grid_means[0]), ABOVE
    elif j == len(grid) - 1 and b >= grid[-1] * (1 - 2 * B_TOLERANCE):
        b, best_f, side = float(grid[-1]), float(grid_means[-1]), BELOW
    return Optimum(b, best_f, side)
