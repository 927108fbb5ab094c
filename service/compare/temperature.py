"""Per-sample NLL of a model at its own best temperature T*, for paired tests on calibrated NLL.

CompareModels recommends by calibrated NLL only when the lead is significant,
so it needs the calibrated loss sample by sample: each sample's NLL at the
model's T*. It is the engine's own temperature model (curve.py: each sample's
log-sum over the other classes, with its first two derivatives, at the grid
points, a quintic Hermite piece between them) evaluated
at T*, so the mean of the per-sample values is the engine's calibrated NLL (the
same float64 function the engine minimised), and a paired difference of these
means is a difference of calibrated NLLs. Where T* lies beyond the grid the
engine reports the grid's end and the model is evaluated there, as reported.

Legacy records (version-1/2 blobs, NLL at the grid points only) use the
parabola in log T through the grid point of lowest mean NLL and its two
neighbours, which is what the engine's scan falls back to for them.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.curve import sample_nll
from evalstream.service.engine.records import Records

F64 = npt.NDArray[np.float64]


def lagrange_weights(x: tuple[float, float, float], at: float) -> tuple[float, float, float]:
    """Weights w with p(at) = sum w_j f_j for the parabola p through (x_j, f_j)."""
    x0, x1, x2 = x
    return (
        (at - x1) * (at - x2) / ((x0 - x1) * (x0 - x2)),
        (at - x0) * (at - x2) / ((x1 - x0) * (x1 - x2)),
        (at - x0) * (at - x1) / ((x2 - x0) * (x2 - x1)),
    )


def sample_nll_at(records: Records, temperature: float) -> F64:
    """[n] NLL of every sample at ``temperature``, as the engine's temperature scan models it."""
    if not records.legacy and len(records) and math.isfinite(temperature) and temperature > 0.0:
        grid = records.inverse_temperatures
        b = min(max(1.0 / temperature, float(grid[0])), float(grid[-1]))
        return sample_nll(records, b)
    columns = records.nll_t[:, ::-1].astype(np.float64)  # increasing T
    g = columns.shape[1]
    if not math.isfinite(temperature) or temperature <= 0.0 or g < 3 or len(records) == 0:
        return records.nll.astype(np.float64)
    log_t = -np.log(np.asarray(records.inverse_temperatures, dtype=np.float64))[::-1]
    j = int(np.argmin(columns.mean(axis=0)))
    if j == 0 or j == g - 1:
        return columns[:, j]
    w = lagrange_weights((float(log_t[j - 1]), float(log_t[j]), float(log_t[j + 1])), math.log(temperature))
    return w[0] * columns[:, j - 1] + w[1] * columns[:, j] + w[2] * columns[:, j + 1]
