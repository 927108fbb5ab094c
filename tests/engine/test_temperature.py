"""Temperature: accuracy does not depend on T; the grid matches rescaled logits; T* by parabola."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalstream.service.engine import Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.engine.temperature import scan
from tests.engine.data import TEST_CONFIG, make_data


def test_accuracy_does_not_depend_on_temperature() -> None:
    data = make_data(100, 1000, 91)
    reducer = ChunkReducer(100, TEST_CONFIG)
    base = reducer.reduce(data.logits, data.labels)
    base_rep = compute_metrics(base, 100, TEST_CONFIG)
    for j, a in enumerate(TEST_CONFIG.inverse_temperatures):
        scaled = reducer.reduce(data.logits * np.float32(a), data.labels)
        rep = compute_metrics(scaled, 100, TEST_CONFIG)
        assert rep.top_k == base_rep.top_k
        if math.log2(a).is_integer():  # scaling by a power of two is exact: identical ranks
            np.testing.assert_array_equal(scaled.rank, base.rank)
            np.testing.assert_array_equal(scaled.pred, base.pred)
        # The grid column j is the NLL of the logits scaled by a.
        np.testing.assert_allclose(base.nll_t[:, j], scaled.nll, rtol=5e-6, atol=2e-5)


def _records_with_curve(grid: tuple[float, ...], curve: np.ndarray) -> Records:
    n, g = 4, len(grid)
    recs = Records.empty(grid)
    return Records(
        sample_id=np.full(n, -1, np.int64),
        label=np.zeros(n, np.int32),
        pred=np.zeros(n, np.int32),
        rank=np.zeros(n, np.uint16),
        ties=np.zeros(n, np.uint32),
        nll=np.full(n, curve[grid.index(1.0)], np.float32),
        confidence=np.full(n, 0.5, np.float32),
        brier=np.zeros(n, np.float32),
        entropy=np.zeros(n, np.float32),
        log_rest=np.empty((n, 0), np.float32),
        rest_slope=np.empty((n, 0), np.float16),
        rest_curvature=np.empty((n, 0), np.float16),
        inverse_temperatures=recs.inverse_temperatures,
        legacy_nll_t=np.tile(curve.astype(np.float32), (n, 1)).reshape(n, g),
    )


# The default grid of version-2 records, whose scan (legacy records) is the parabola below.
LEGACY_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def test_parabola_recovers_a_quadratic_minimum_in_log_t() -> None:
    grid = LEGACY_GRID
    t_true = 1.3
    curve = np.array([2.0 + 0.5 * (math.log(1 / a) - math.log(t_true)) ** 2 for a in grid])
    result = scan(_records_with_curve(grid, curve).nll_t, np.asarray(grid))
    assert result.best_temperature == pytest.approx(t_true, rel=1e-5)
    assert result.calibrated_nll == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize(("t_true", "end"), [(10.0, 4.0), (0.1, 0.25)])
def test_minimum_at_the_grid_end_reports_the_end(t_true: float, end: float) -> None:
    grid = LEGACY_GRID
    curve = np.array([1.0 + (math.log(1 / a) - math.log(t_true)) ** 2 for a in grid])
    result = scan(_records_with_curve(grid, curve).nll_t, np.asarray(grid))
    assert result.best_temperature == end
    assert result.calibrated_nll == pytest.approx(float(curve[grid.index(1 / end)]), rel=1e-6)
