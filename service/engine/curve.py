"""Each sample's NLL at any temperature, from a record of fixed size, and the exact best temperature.

With d_c = z_c - max z (<= 0) and the margin g = max z - z_y, a sample's NLL at inverse temperature b is

    NLL(b) = b g + log(1 + sum_{i=2..4} exp(b d_(i)) + R(b)),   R(b) = sum_{c outside the top 4} exp(b d_c)

(d_(i) the i-th largest gap; the largest is 0). The bend of a sample's curve comes from its few
leading classes: their terms are kept exactly (``top_gaps``, 3 float32s), and only log R, a smooth
sum over the many remaining classes, is interpolated between the grid points where the engine
computed it (``log_rest``): a cubic Hermite piece in b between the two grid points around b, its
slopes at the grid points from the cubics through 4 neighbouring points (local: a value at one
grid point moves the curve only near it; smooth: the mean curve has no kink at a grid point, so
compare's per-replicate parabola around T* sees the same minimum). The margin is ``nll + log(confidence)``
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


def _lagrange_slope(grid: F64, idx: range, at: int) -> F64:
    """Weights over ``grid`` of the derivative at grid[at] of the polynomial through the points idx."""
    w = np.zeros(len(grid))
    x = grid[at]
    for j in idx:
        total = 0.0
        for m in idx:
            if m == j:
                continue
            term = 1.0 / (grid[j] - grid[m])
            for k in idx:
                if k not in (j, m):
                    term *= (x - grid[k]) / (grid[j] - grid[k])
            total += term
        w[j] = total
    return w


def _slope(grid: F64, i: int) -> F64:
    """Weights of log R'(b_i): the mean of the derivatives of the cubics through the two 4-point
    stencils centred on b_i (one at an end), so the interpolant is smooth (C1) at every grid point."""
    g = len(grid)
    width = min(4, g)
    stencils = [lo for lo in (i - 1, i - 2) if lo >= 0 and lo + width <= g]
    if not stencils:
        stencils = [int(np.clip(i - 1, 0, g - width))]
    return sum((_lagrange_slope(grid, range(lo, lo + width), i) for lo in stencils), np.zeros(g)) / len(
        stencils
    )


def interpolation(grid: F64, b: float) -> tuple[int, F64]:
    """(first index, weights) with log R(b) = sum_k w_k log_rest[:, first + k]: the cubic Hermite
    piece between the grid points around ``b``, with slopes from 4-point stencils (``_slope``)."""
    g = len(grid)
    if g == 1:
        return 0, np.ones(1)
    i = int(np.clip(np.searchsorted(grid, b) - 1, 0, g - 2))
    h = grid[i + 1] - grid[i]
    t = (b - grid[i]) / h
    w = np.zeros(g)
    w[i] += 2 * t**3 - 3 * t**2 + 1
    w[i + 1] += -2 * t**3 + 3 * t**2
    w += (t**3 - 2 * t**2 + t) * h * _slope(grid, i) + (t**3 - t**2) * h * _slope(grid, i + 1)
    nonzero = np.flatnonzero(w)
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    return lo, w[lo:hi]


def margins(records: Records) -> F64:
    """max z - z_y of every sample: NLL - log S with log S = -log(confidence)."""
    return records.nll.astype(np.float64) + np.log(records.confidence.astype(np.float64))


def sample_nll(records: Records, b: float, margin: F64 | None = None) -> F64:
    """[n] NLL of every sample at inverse temperature ``b`` (within the grid), float64."""
    grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
    g = margins(records) if margin is None else margin
    lo, w = interpolation(grid, b)
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
