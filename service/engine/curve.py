"""Each sample's NLL at any temperature, from a record of fixed size, and the exact best temperature.

With the margin g = max z - z_y (``nll + log(confidence)``) and L(b) the log of the sum of
exp(b (z_c - max z)) over the classes other than the top one, a sample's NLL at inverse
temperature b is

    NLL(b) = b g + log(1 + exp(L(b)))

The engine stores L, b L' and b^2 L'' at each grid point (``log_rest``, ``rest_slope``,
``rest_curvature``; moments.py); between two grid points L is the quintic Hermite polynomial in b
that matches all three at both ends. Its error falls as the sixth power of the spacing: on the
default grid (ratios 1.5-2) T* is within 2.8e-4 and the calibrated NLL within 6.8e-5 nats of the
exact ones for Gaussian, heavy-tailed, uniform and the demo's logits with T* at 7 values between
grid points across [0.05, 20], where the values alone (a cubic through 19 points) were off by up
to 2.2e-3 and values with slopes (13 points) by 1.3e-3 (``python -m bench.temperature``, docs/metrics.md). The
derivatives are float16: their rounding is random across samples and moved the calibrated NLL by a
few 1e-6 in a float64 study.

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


def hermite_weights(t: float) -> tuple[float, float, float, float, float, float]:
    """Quintic Hermite basis at t in [0, 1]: weights of (f0, h f0', h^2 f0'', h^2 f1'', h f1', f1)."""
    t2, t3 = t * t, t * t * t
    t4, t5 = t3 * t, t3 * t2
    return (
        1 - 10 * t3 + 15 * t4 - 6 * t5,
        t - 6 * t3 + 8 * t4 - 3 * t5,
        0.5 * t2 - 1.5 * t3 + 1.5 * t4 - 0.5 * t5,
        0.5 * t3 - t4 + 0.5 * t5,
        -4 * t3 + 7 * t4 - 3 * t5,
        10 * t3 - 15 * t4 + 6 * t5,
    )


def margins(records: Records) -> F64:
    """max z - z_y of every sample: NLL - log S with log S = -log(confidence)."""
    return records.nll.astype(np.float64) + np.log(records.confidence.astype(np.float64))


class Curve:
    """The model of a set of records, with the columns every evaluation reads laid out once: one
    contiguous float64 row per grid point of L, L' and L'' (in b), so an evaluation streams through a
    few contiguous arrays instead of strided record columns.

    The rows are kept in an order set by their content (margin, then L at the middle grid point),
    not by arrival: a float64 sum depends on the order of its terms, and T* (Brent's search on the
    mean) must not depend on the order in which ranks arrived. ``sample`` answers in record order.
    """

    def __init__(self, records: Records) -> None:
        self.records = records
        self.grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
        margin = margins(records)
        mid = records.log_rest[:, len(self.grid) // 2] if len(self.grid) else margin
        self.order = np.lexsort((mid, margin))
        self.margin = margin[self.order]
        self.value = np.ascontiguousarray(records.log_rest[self.order].T, dtype=np.float64)
        self.slope = (
            np.ascontiguousarray(records.rest_slope[self.order].T, dtype=np.float64) / self.grid[:, None]
        )
        self.curvature = np.ascontiguousarray(records.rest_curvature[self.order].T, dtype=np.float64) / (
            self.grid[:, None] ** 2
        )

    def log_rest(self, b: float) -> F64:
        """[n] L(b) of every sample (b within the grid), in the content order."""
        g = len(self.grid)
        if g == 1:
            return self.value[0].copy()
        i = int(np.clip(np.searchsorted(self.grid, b) - 1, 0, g - 2))
        h = self.grid[i + 1] - self.grid[i]
        w0, w1, w2, w3, w4, w5 = hermite_weights((b - self.grid[i]) / h)
        out = self.value[i] * w0
        out += self.slope[i] * (w1 * h)
        out += self.curvature[i] * (w2 * h * h)
        out += self.curvature[i + 1] * (w3 * h * h)
        out += self.slope[i + 1] * (w4 * h)
        out += self.value[i + 1] * w5
        return out

    def _sorted_sample(self, b: float) -> F64:
        return b * self.margin + np.logaddexp(0.0, self.log_rest(b))

    def sample(self, b: float) -> F64:
        """[n] NLL of every sample at inverse temperature ``b`` (within the grid), float64, in the
        records' order."""
        out = np.empty(len(self.margin))
        out[self.order] = self._sorted_sample(b)
        return out

    def mean(self, b: float) -> float:
        return float(np.mean(self._sorted_sample(b))) if len(self.records) else math.nan


def sample_nll(records: Records, b: float) -> F64:
    """[n] NLL of every sample at inverse temperature ``b`` (within the grid), float64, in the records'
    order: reads only the two grid points around b (a Curve sorts and converts every column, which
    pays off only for many evaluations)."""
    grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
    margin = margins(records)
    if len(grid) == 1:
        return b * margin + np.logaddexp(0.0, records.log_rest[:, 0].astype(np.float64))
    i = int(np.clip(np.searchsorted(grid, b) - 1, 0, len(grid) - 2))
    h = grid[i + 1] - grid[i]
    w0, w1, w2, w3, w4, w5 = hermite_weights((b - grid[i]) / h)

    def col(name: str, j: int) -> F64:
        return getattr(records, name)[:, j].astype(np.float64)

    out = col("log_rest", i) * w0
    out += col("rest_slope", i) * (w1 * h / grid[i])
    out += col("rest_curvature", i) * (w2 * h * h / grid[i] ** 2)
    out += col("rest_curvature", i + 1) * (w3 * h * h / grid[i + 1] ** 2)
    out += col("rest_slope", i + 1) * (w4 * h / grid[i + 1])
    out += col("log_rest", i + 1) * w5
    return b * margin + np.logaddexp(0.0, out)


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
