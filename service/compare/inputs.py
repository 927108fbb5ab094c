"""What CompareModels takes: candidates as the store holds them, and the comparison settings."""

from __future__ import annotations

from dataclasses import dataclass

from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.records import Records
from evalstream.service.errors import ServiceError
from evalstream.v1 import compare_pb2


class CompareError(ServiceError):
    """A comparison that cannot be made; ``code`` is the gRPC status name the servicer answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code)


@dataclass
class CandidateInput:
    """One stored evaluation. ``metrics`` is its EvaluationResult.metrics map; ``records`` is None
    when retention dropped them (the candidate is then ranked on stored metrics only)."""

    run: str
    model: str
    split: str
    step: int
    evaluation_id: str
    num_classes: int
    metrics: dict[str, float]
    records: Records | None


@dataclass
class CompareOptions:
    """Comparison settings; the servicer fills them from the request over the server configuration.

    ``engine_config``: the engine settings the candidates were evaluated with
    (bins, top-k), needed to recompute metrics on a common subset of samples;
    defaults to ``EngineConfig(top_k=top_k)``.
    ``agreement_metrics``: Kendall's tau is reported between these headline metrics.
    ``recommendation``: "off" (none), "advisory" (reported, the verdict's headline stays the
    primary ranking) or "on" (the recommendation is the verdict's headline).
    """

    primary_metric: str = "nll"
    secondary_metric: str = "accuracy_top1"
    tie_tolerance: float = 1e-9
    replicates: int = 1000
    confidence_level: float = 0.95
    seed: int = 0
    top_k: tuple[int, ...] = (1, 5)
    gate: compare_pb2.Gate | None = None
    # "off", "advisory" or "on" (docs/compare.md, "Recommendation").
    recommendation: str = "on"
    engine_config: EngineConfig | None = None
    agreement_metrics: tuple[str, ...] = (
        "nll",
        "accuracy_top1",
        "accuracy_top5",
        "balanced_accuracy",
        "macro_f1",
        "ece",
        "brier",
        "calibrated_nll",
    )

    def engine(self) -> EngineConfig:
        return self.engine_config if self.engine_config is not None else EngineConfig(top_k=self.top_k)
