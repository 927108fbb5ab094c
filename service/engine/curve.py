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

The curve of the mean over samples, ``Curve.mean``, is minimised over [b_min, b_max] in float64 by
Brent's method in log b inside the bracket of the best grid point; T* = 1 / b*. Where the
minimum is at an end of the grid the optimum lies beyond it, and ``optimum`` says on which side.
The paired tests of compare evaluate the same ``sample_nll`` at T*, so the mean of their per-sample
values is the reported calibrated NLL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.records import Records

F64 = npt.NDArray[np.float64]

# Brent's search in log b stops at this tolerance (T* to about 1e-6 relative).
B_TOLERANCE = 1e-6
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


class Curve:
    """The model of a set of records, with the columns every evaluation reads laid out once: one
    contiguous row per gap (float64) and per grid point (float32), so an evaluation streams through
    a few contiguous arrays instead of strided record columns."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
        self.margin = margins(records)
        self.gaps = np.ascontiguousarray(records.top_gaps.T, dtype=np.float64)
        self.rest = np.ascontiguousarray(records.log_rest.T)

    def sample(self, b: float) -> F64:
        """[n] NLL of every sample at inverse temperature ``b`` (within the grid), float64."""
        lo, w = interpolation(self.grid, b)
        log_rest = np.multiply(self.rest[lo], w[0], dtype=np.float64)
        for k in range(1, len(w)):
            log_rest += np.multiply(self.rest[lo + k], w[k], dtype=np.float64)
        with np.errstate(under="ignore"):
            total = np.exp(log_rest)
            total += 1.0
            for gap in self.gaps:
                total += np.exp(b * gap)
        return b * self.margin + np.log(total)

    def mean(self, b: float) -> float:
        return float(np.mean(self.sample(b))) if len(self.records) else math.nan


def sample_nll(records: Records, b: float) -> F64:
    """[n] NLL of every sample at inverse temperature ``b`` (within the grid), float64."""
    return Curve(records).sample(b)


def _brent(f: Callable[[float], float], a: float, b: float, tol: float) -> tuple[float, float]:
    """Brent's minimisation of f on [a, b] (golden sections with parabolic steps), to ``tol``."""
    c = 0.5 * (3.0 - math.sqrt(5.0))
    x = w = v = a + c * (b - a)
    fx = fw = fv = f(x)
    d = e = 0.0
    while True:
        m = 0.5 * (a + b)
        tol2 = 2.0 * tol
        if abs(x - m) <= tol2 - 0.5 * (b - a):
            return x, fx
        golden = True
        if abs(e) > tol:
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            if abs(p) < abs(0.5 * q * e) and q * (a - x) < p < q * (b - x):
                e, d = d, p / q
                golden = False
                if (x + d) - a < tol2 or b - (x + d) < tol2:
                    d = tol if m >= x else -tol
        if golden:
            e = (a - x) if x >= m else (b - x)
            d = c * e
        u = x + (d if abs(d) >= tol else (tol if d > 0 else -tol))
        fu = f(u)
        if fu <= fx:
            if u >= x:
                a = x
            else:
                b = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v in (x, w):
                v, fv = u, fu


@dataclass(frozen=True)
class Optimum:
    """b* (the inverse of T*), the mean NLL there, and where it lies against the grid."""

    inverse_temperature: float
    nll: float
    side: int  # INSIDE, ABOVE (T* > the grid's highest T) or BELOW (T* < its lowest)


def optimum(curve: Curve, grid_means: F64) -> Optimum:
    """The minimum of ``curve.mean`` over [b_min, b_max]; ``grid_means`` its values at the grid points."""
    grid = curve.grid
    j = int(np.argmin(grid_means))
    if len(grid) < 2:
        return Optimum(float(grid[j]), float(grid_means[j]), INSIDE)
    lo, hi = math.log(grid[max(j - 1, 0)]), math.log(grid[min(j + 1, len(grid) - 1)])
    x, fx = _brent(lambda log_b: curve.mean(math.exp(log_b)), lo, hi, B_TOLERANCE)
    b, best = (math.exp(x), fx) if fx < grid_means[j] else (float(grid[j]), float(grid_means[j]))
    side = INSIDE
    if j == 0 and b <= grid[0] * (1 + 4 * B_TOLERANCE):
        b, best, side = float(grid[0]), float(grid_means[0]), ABOVE
    elif j == len(grid) - 1 and b >= grid[-1] * (1 - 4 * B_TOLERANCE):
        b, best, side = float(grid[-1]), float(grid_means[-1]), BELOW
    return Optimum(b, best, side)
