"""Comparison dataclasses -> evalstream.v1.CompareModelsResponse.

NaN marks "not computed" in a double field (the best candidate's McNemar
p-value, candidates without records); unset message fields mark the same for
intervals and gates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from evalstream.service.compare.bootstrap import Interval
from evalstream.service.compare.causes import Cause
from evalstream.service.compare.classes import ClassRegressionResult
from evalstream.service.compare.diagnosis import PairDiagnosisResult
from evalstream.service.compare.recommend import RecommendationResult
from evalstream.service.compare.result import CandidateOutcome, Comparison
from evalstream.v1 import compare_pb2, evaluation_pb2, service_pb2


def loss_summary(m: Mapping[str, float]) -> evaluation_pb2.LossSummary:
    """The loss split from a metrics map (share_correct is 1 - share_wrong when there is loss)."""
    share_wrong = m.get("loss_share_wrong", 0.0)
    return evaluation_pb2.LossSummary(
        mean=m.get("nll", math.nan),
        p50=m.get("nll_p50", math.nan),
        p90=m.get("nll_p90", math.nan),
        p99=m.get("nll_p99", math.nan),
        mean_correct=m.get("nll_correct", math.nan),
        mean_wrong=m.get("nll_wrong", math.nan),
        share_correct=1.0 - share_wrong if m.get("nll", 0.0) > 0 else 0.0,
        share_wrong=share_wrong,
    )


MODES = {
    "off": compare_pb2.RECOMMENDATION_MODE_OFF,
    "advisory": compare_pb2.RECOMMENDATION_MODE_ADVISORY,
    "on": compare_pb2.RECOMMENDATION_MODE_ON,
}


def interval(iv: Interval) -> compare_pb2.ConfidenceInterval:
    return compare_pb2.ConfidenceInterval(
        estimate=iv.estimate, lower=iv.lower, upper=iv.upper, level=iv.level
    )


def recommendation(r: RecommendationResult, result: Comparison) -> compare_pb2.Recommendation:
    out = compare_pb2.Recommendation(
        mode=MODES[r.mode],
        model=r.model,
        basis=r.basis,
        temperature=r.temperature,
        text=r.text,
        rankings_disagree=r.rankings_disagree,
        accuracy_agrees_with_calibrated=r.accuracy_agrees,
        calibrated_best=r.calibrated_best,
        calibrated_differences={name: interval(iv) for name, iv in r.calibrated_differences.items()},
    )
    chosen = next((c for c in result.candidates if c.name == r.model), None) if r.model else None
    if chosen is not None:
        out.evaluation_id = chosen.evaluation_id
        out.ref.CopyFrom(
            evaluation_pb2.EvaluationRef(
                run=chosen.run, model=chosen.model, split=chosen.split, step=chosen.step
            )
        )
    return out


def cause(c: Cause) -> compare_pb2.Cause:
    return compare_pb2.Cause(
        name=c.name,
        models=c.models,
        quantity=c.quantity,
        values=c.values,
        threshold=c.threshold,
        finding=c.finding,
    )


def class_regressions(r: ClassRegressionResult) -> compare_pb2.ClassRegressions:
    return compare_pb2.ClassRegressions(
        model=r.model,
        other=r.other,
        baseline=r.baseline,
        classes_tested=r.classes_tested,
        fdr_level=r.fdr_level,
        worse=r.worse,
        better=r.better,
        changes=[
            compare_pb2.ClassChange(
                class_index=ch.class_index,
                support=ch.support,
                recall=ch.recall,
                other_recall=ch.other_recall,
                only_model_right=ch.only_model_right,
                only_other_right=ch.only_other_right,
                p_value=ch.p_value,
                q_value=ch.q_value,
            )
            for ch in r.changes
        ],
    )


def candidate_result(c: CandidateOutcome) -> compare_pb2.CandidateResult:
    out = compare_pb2.CandidateResult(
        ref=evaluation_pb2.EvaluationRef(run=c.run, model=c.model, split=c.split, step=c.step),
        evaluation_id=c.evaluation_id,
        rank=c.rank,
        metrics=c.metrics,
        delta_to_best=c.delta_to_best,
        rank_by_metric=c.rank_by_metric,
        distinguishable_from_best=c.distinguishable,
        mcnemar_p_value=math.nan if c.mcnemar_p is None else c.mcnemar_p,
        samples_used=c.samples_used,
    )
    if c.interval is not None:
        out.primary_difference.CopyFrom(interval(c.interval))
    if c.gate is not None:
        out.gate.CopyFrom(compare_pb2.GateResult(passed=c.gate.passed, reasons=c.gate.reasons))
    return out


def pair_diagnosis(d: PairDiagnosisResult) -> compare_pb2.PairDiagnosis:
    out = compare_pb2.PairDiagnosis(
        model_a=d.model_a,
        model_b=d.model_b,
        causes=d.causes,
        findings=d.findings,
        loss_a=loss_summary(d.metrics_a),
        loss_b=loss_summary(d.metrics_b),
        calibrated_nll_a=d.metrics_a.get("calibrated_nll", math.nan),
        calibrated_nll_b=d.metrics_b.get("calibrated_nll", math.nan),
        best_temperature_a=d.metrics_a.get("best_temperature", math.nan),
        best_temperature_b=d.metrics_b.get("best_temperature", math.nan),
        paired=d.flips is not None,
    )
    if d.flips is not None:
        f = d.flips
        out.flips.CopyFrom(
            compare_pb2.Flips(
                a_right_b_wrong=f.a_right_b_wrong,
                b_right_a_wrong=f.b_right_a_wrong,
                a_confidence_on_a_wins=f.a_confidence_on_a_wins,
                b_confidence_on_b_wins=f.b_confidence_on_b_wins,
                a_confidence_on_b_wins=f.a_confidence_on_b_wins,
                b_confidence_on_a_wins=f.b_confidence_on_a_wins,
            )
        )
    return out


def to_response(result: Comparison) -> service_pb2.CompareModelsResponse:
    out = service_pb2.CompareModelsResponse(
        primary_metric=result.primary_metric,
        higher_is_better=result.higher_is_better,
        candidates=[candidate_result(c) for c in result.candidates],
        paired=result.paired,
        common_samples=result.common_samples,
        verdict=result.verdict,
        diagnoses=[pair_diagnosis(d) for d in result.diagnoses],
        agreements=[
            compare_pb2.MetricAgreement(metric_a=a, metric_b=b, kendall_tau=t)
            for a, b, t in result.agreements
        ],
        bootstrap_replicates=result.replicates,
        seed=result.seed,
        causes=[cause(c) for c in result.causes],
        class_regressions=[class_regressions(r) for r in result.class_regressions],
    )
    if result.recommendation is not None:
        out.recommendation.CopyFrom(recommendation(result.recommendation, result))
    return out
