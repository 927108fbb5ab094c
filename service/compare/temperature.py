"""Per-sample NLL of a model at its own best temperature T*, for paired tests on calibrated NLL.

CompareModels recommends by calibrated NLL only when the lead is significant,
so it needs the calibrated loss sample by sample: each sample's NLL at the
model's T*. Records carry each sample's NLL on the temperature grid
(``nll_t``). Each sample's curve is interpolated by the same parabola in log T
the engine fits to the mean curve (through the grid point of lowest mean NLL
and its two neighbours): the interpolation is linear in the grid values, so
the mean of the per-sample values is exactly the engine's calibrated NLL, and a
paired difference of these means is a difference of calibrated NLLs. At an end
of the grid the end column is used, as the engine reports the end.

This is the one place compare reads the temperature curve of a sample, so a
finer engine interpolation replaces the body of ``sample_nll_at`` only.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

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
    """[n] NLL of every sample at ``temperature``, interpolated as the engine's temperature scan."""
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
