"""Temperature scan: mean NLL over the grid, T* and the calibrated NLL.

Records of this version carry a model of each sample's NLL at any temperature (curve.py): T* is
the exact minimum of its mean, beyond-the-grid optima are reported as such. Legacy records
(version 1/2 blobs, the NLL at the grid points only) fall back to the parabola in log T through the
grid minimum and its two neighbours, as before.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from evalstream.service.engine import curve
from evalstream.service.engine.records import Records
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


def scan_records(records: Records, model: curve.Curve | None = None) -> TemperatureScan:
    """The scan of a set of records: the exact optimum of the temperature model, or, for legacy
    records, the parabola through the grid minimum (``scan``). ``model``: the records' Curve where
    the caller has built it already (it sorts and copies every column once)."""
    grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
    if records.legacy or len(records) == 0:
        return scan(records.nll_t, grid)
    model = model if model is not None else curve.Curve(records)
    means = np.array([model.mean(float(b)) for b in grid])
    best = curve.optimum(model, means)
    return TemperatureScan(
        temperatures=[float(1.0 / b) for b in grid[::-1]],
        nll=[float(v) for v in means[::-1]],
        best_temperature=1.0 / best.inverse_temperature,
        calibrated_nll=best.nll,
        beyond_grid=best.side,
    )


def scan(
    nll_t: npt.NDArray[np.float32] | npt.NDArray[np.float64], inverse_temperatures: npt.NDArray[np.float64]
) -> TemperatureScan:
    """Mean NLL at each T (increasing T); T* and the NLL there (legacy records).

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
