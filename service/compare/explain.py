"""Why, and which to pick: causes (once each), pair diagnoses, the recommendation, per-class changes.

Runs after ranking and significance (core.py) on the candidates' aligned
records and metrics; every number it states is in the response beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from evalstream.service.compare.bootstrap import Interval
from evalstream.service.compare.causes import (
    Cause,
    ModelFacts,
    low_confidence_correct,
    model_causes,
    wrong_confidence,
)
from evalstream.service.compare.classes import ClassRegressionResult, class_changes
from evalstream.service.compare.diagnosis import PairDiagnosisResult, diagnose, disagree
from evalstream.service.compare.inputs import CompareOptions
from evalstream.service.compare.recommend import RecommendationResult, recommend
from evalstream.service.engine.records import Records


@dataclass
class Explained:
    causes: list[Cause] = field(default_factory=list)
    diagnoses: list[PairDiagnosisResult] = field(default_factory=list)
    recommendation: RecommendationResult | None = None
    class_regressions: list[ClassRegressionResult] = field(default_factory=list)


def _diagnoses(
    names: Sequence[str],
    metrics: Sequence[Mapping[str, float]],
    records: Sequence[Records | None],
    order: Sequence[int],
    tolerance: float,
    paired: bool,
    held: Mapping[str, set[str]],
) -> list[PairDiagnosisResult]:
    out = []
    for x, i in enumerate(order):
        for j in order[x + 1 :]:
            if disagree(metrics[i], metrics[j], tolerance):
                ri, rj = (records[i], records[j]) if paired else (None, None)
                out.append(diagnose(names[i], metrics[i], names[j], metrics[j], ri, rj, held))
    return out


def _class_regressions(
    subject: int,
    names: Sequence[str],
    records: Sequence[Records | None],
    order: Sequence[int],
    baseline: tuple[str, Records | None, int | None] | None,
    num_classes: int,
    level: float,
) -> list[ClassRegressionResult]:
    mine = records[subject]
    if mine is None:
        return []
    base_index = baseline[2] if baseline is not None else None
    out = []
    for j in order:
        other = records[j]
        if j != subject and other is not None:
            out.append(
                class_changes(
                    names[subject], names[j], mine, other, num_classes, level, baseline=j == base_index
                )
            )
    if baseline is not None and base_index is None and baseline[1] is not None:
        out.append(
            class_changes(names[subject], baseline[0], mine, baseline[1], num_classes, level, baseline=True)
        )
    return out


def explain(
    names: Sequence[str],
    metrics: Sequence[Mapping[str, float]],
    records: Sequence[Records | None],
    order: Sequence[int],
    options: CompareOptions,
    calibrated: Mapping[int, Interval],
    calibrated_best: int | None,
    distinguishable: Mapping[int, bool],
    *,
    paired: bool,
    baseline: tuple[str, Records | None, int | None] | None,
    num_classes: int,
) -> Explained:
    """Causes, diagnoses, recommendation and per-class changes of ranked candidates (index order)."""
    facts = [ModelFacts(names[i], metrics[i], wrong_confidence(records[i])) for i in order]
    causes = model_causes(facts)
    held: dict[str, set[str]] = {}
    for cause in causes:
        for model in cause.models:
            held.setdefault(model, set()).add(cause.name)
    diagnoses = _diagnoses(names, metrics, records, order, options.tie_tolerance, paired, held)
    split = low_confidence_correct([(d.model_a, d.metrics_a, d.model_b, d.metrics_b) for d in diagnoses])
    if split is not None:
        causes.append(split)
    rec = recommend(
        options.recommendation,
        names,
        metrics,
        order,
        options.primary_metric,
        distinguishable,
        calibrated,
        calibrated_best,
    )
    subject = rec.index if rec is not None and rec.index is not None else order[0]
    regressions = (
        _class_regressions(
            subject, names, records, order, baseline, num_classes, 1 - options.confidence_level
        )
        if paired
        else []
    )
    return Explained(causes, diagnoses, rec, regressions)
