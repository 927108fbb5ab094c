"""A best temperature beyond the grid is reported as a bound ("T* < 0.05", "T* > 20"), end to end:
engine records, the compare text (recommendation and causes), the CLI renderings."""

from __future__ import annotations

import numpy as np

from evalstream.client.compare_view import _metric_cell
from evalstream.client.render import _temperature
from evalstream.service.compare.causes import ModelFacts, temperature_causes
from evalstream.service.compare.recommend import _at
from evalstream.service.convert import result_from_report
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.engine.report import MetricReport

C = 200


def _metrics(scale: float) -> tuple[dict[str, float], MetricReport]:
    """Engine metrics of Gaussian logits with a label bump, multiplied by ``scale``."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, C, 400)
    z = rng.standard_normal((400, C))
    z[np.arange(400), y] += 3.0
    cfg = EngineConfig(device="cpu")
    report = compute_metrics(ChunkReducer(C, cfg).reduce((z * scale).astype(np.float32), y), C, cfg)
    return report.scalars(), report


def test_under_and_over_confidence_beyond_the_grid_read_as_bounds() -> None:
    sharp, sharp_report = _metrics(0.005)  # T* far below 0.05: the optimum is beyond the grid
    flat, _ = _metrics(100.0)  # T* far above 20
    assert sharp["temperature_beyond_grid"] == -1 and sharp["best_temperature"] == 0.05
    assert flat["temperature_beyond_grid"] == 1 and flat["best_temperature"] == 20.0
    assert "T* < 0.05" in _at(sharp) and "T* > 20" in _at(flat)
    causes = {c.name: c for c in temperature_causes([ModelFacts("a", sharp), ModelFacts("b", flat)])}
    assert "T* < 0.05" in causes["underconfident"].finding
    assert "T* > 20" in causes["overconfident"].finding
    assert _metric_cell(sharp, "best_temperature", "{:.2f}") == "<0.05"
    assert _metric_cell(flat, "best_temperature", "{:.2f}") == ">20"
    result = result_from_report(sharp_report)
    assert result.temperature.beyond_grid == -1
    assert "T* < 0.05 (beyond the grid)" in _temperature(result)


def test_an_inside_optimum_reads_as_a_value() -> None:
    inside, _ = _metrics(1.0)
    assert inside["temperature_beyond_grid"] == 0
    assert _at(inside) == f"T={inside['best_temperature']:.2f}"
