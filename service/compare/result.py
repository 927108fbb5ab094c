"""The comparison as plain dataclasses; to_proto.py turns it into the response."""

from __future__ import annotations

from dataclasses import dataclass, field

from evalstream.service.compare.bootstrap import Interval
from evalstream.service.compare.causes import Cause
from evalstream.service.compare.classes import ClassRegressionResult
from evalstream.service.compare.diagnosis import PairDiagnosisResult
from evalstream.service.compare.gate import GateOutcome
from evalstream.service.compare.recommend import RecommendationResult


@dataclass
class CandidateOutcome:
    run: str
    model: str
    split: str
    step: int
    evaluation_id: str
    name: str
    rank: int
    metrics: dict[str, float]
    delta_to_best: dict[str, float]
    rank_by_metric: dict[str, int]
    # Difference of the primary metric to the best; None without records.
    interval: Interval | None
    distinguishable: bool
    # McNemar's exact p-value against the best; None when not paired.
    mcnemar_p: float | None
    samples_used: int
    gate: GateOutcome | None = None


@dataclass
class Comparison:
    primary_metric: str
    higher_is_better: bool
    candidates: list[CandidateOutcome]
    paired: bool
    common_samples: int
    replicates: int
    seed: int
    confidence_level: float
    diagnoses: list[PairDiagnosisResult] = field(default_factory=list)
    # (metric_a, metric_b, tau)
    agreements: list[tuple[str, str, float]] = field(default_factory=list)
    # None when the recommendation is off.
    recommendation: RecommendationResult | None = None
    # Each cause once, with every model it holds for.
    causes: list[Cause] = field(default_factory=list)
    # Recommended (else primary-best) model against every other candidate and the gate's baseline.
    class_regressions: list[ClassRegressionResult] = field(default_factory=list)
    verdict: str = ""
