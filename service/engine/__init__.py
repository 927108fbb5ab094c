"""The metric engine: pure (no gRPC, no storage), tensors in, records out, metrics from records.

``ChunkReducer`` turns a chunk of scores into per-sample ``Records`` in one
fused pass; ``compute_metrics`` turns merged records into a ``MetricReport``.
"""

from evalstream.service.engine.config import DEFAULT_INVERSE_TEMPERATURES, EngineConfig
from evalstream.service.engine.errors import ChunkError
from evalstream.service.engine.records import Records
from evalstream.service.engine.registry import MetricInfo, direction, metric_infos
from evalstream.service.engine.report import MetricReport

__all__ = [
    "DEFAULT_INVERSE_TEMPERATURES",
    "ChunkError",
    "EngineConfig",
    "MetricInfo",
    "MetricReport",
    "Records",
    "direction",
    "metric_infos",
]
