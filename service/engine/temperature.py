"""Temperature scan: mean NLL over the grid and T* by parabolic interpolation in log T."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.report import TemperatureScan


def parabola_min(x: tuple[float, float, float], f: tuple[float, float, float]) -> tuple[float, float] | None:
    """Vertex (x*, f*) of the parabola through three points with x0 < x1 < x2 and f1 <= f0, f2.
    None when the points are collinear (no curvature)."""
    (x0, x1, x2), (f0, f1, f2) = x, f
    num = (x1 - x0) ** 2 * (f1 - f2) - (x1 - x2) ** 2 * (f1 - f0)
    den = (x1 - x0) * (f1 - f2) - (x1 - x2) * (f1 - f0)
    if den == 0.0:
        return None
    xs = x1 - 0.5 * num / den
    # Lagrange form evaluated at the vertex.
    fs = (
        f0 * (xs - x1) * (xs - x2) / ((x0 - x1) * (x0 - x2))
        + f1 * (xs - x0) * (xs - x2) / ((x1 - x0) * (x1 - x2))
        + f2 * (xs - x0) * (xs - x1) / ((x2 - x0) * (x2 - x1))
    )
    return xs, fs


def scan(nll_t: npt.NDArray[np.float32], inverse_temperatures: npt.NDArray[np.float64]) -> TemperatureScan:
    """Mean NLL at each T (increasing T); T* and the NLL there.

    At an end of the grid the end itself is reported (the optimum may lie beyond
    it); otherwise the parabola through the minimum and its two neighbours in
    log T gives T* = exp(x*) and the calibrated NLL = the parabola's value there
    (an interpolated estimate, not a recomputation)."""
    n = nll_t.shape[0]
    means = nll_t.astype(np.float64).sum(axis=0) / max(n, 1)
    temps = 1.0 / inverse_temperatures[::-1]
    nll = means[::-1]
    j = int(np.argmin(nll))
    best_t, best_nll = float(temps[j]), float(nll[j])
    if n and 0 < j < len(temps) - 1:
        x = (math.log(temps[j - 1]), math.log(temps[j]), math.log(temps[j + 1]))
        vertex = parabola_min(x, (float(nll[j - 1]), float(nll[j]), float(nll[j + 1])))
        if vertex is not None:
            best_t, best_nll = math.exp(vertex[0]), vertex[1]
    return TemperatureScan(
        temperatures=[float(t) for t in temps],
        nll=[float(v) for v in nll],
        best_temperature=best_t,
        calibrated_nll=best_nll,
    )
