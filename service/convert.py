"""MetricReport and store rows <-> ``evalstream.v1`` messages (mechanical, field for field)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from evalstream.service.engine.metrics import TIE_WARNING_SHARE
from evalstream.service.engine.report import MetricReport
from evalstream.service.store.base import EvaluationKey, EvaluationRow
from evalstream.v1 import evaluation_pb2 as ev_pb2


def result_from_report(report: MetricReport) -> ev_pb2.EvaluationResult:
    """The full result, per-class counts included (the stored form; readers strip what they do not want)."""
    loss, cal, imb, temp = report.loss, report.calibration, report.imbalance, report.temperature
    return ev_pb2.EvaluationResult(
        num_samples=report.num_samples,
        num_classes=report.num_classes,
        duplicates_dropped=report.duplicates_dropped,
        loss=ev_pb2.LossSummary(
            mean=loss.mean,
            p50=loss.p50,
            p90=loss.p90,
            p99=loss.p99,
            mean_correct=loss.mean_correct,
            mean_wrong=loss.mean_wrong,
            share_correct=loss.share_correct,
            share_wrong=loss.share_wrong,
        ),
        top_k=[ev_pb2.TopKAccuracy(k=k, accuracy=v) for k, v in sorted(report.top_k.items())],
        calibration=ev_pb2.Calibration(
            num_bins=cal.num_bins,
            bin_edges=cal.bin_edges,
            ece=cal.ece,
            rms_ce=cal.rms_ce,
            mce=cal.mce,
            adaptive_ece=cal.adaptive_ece,
            mean_confidence=cal.mean_confidence,
            overconfidence=cal.overconfidence,
            bins=[
                ev_pb2.ReliabilityBin(
                    lower=b.lower,
                    upper=b.upper,
                    count=b.count,
                    mean_confidence=b.mean_confidence,
                    accuracy=b.accuracy,
                )
                for b in cal.bins
            ],
        ),
        brier=report.brier,
        entropy=report.entropy,
        imbalance=ev_pb2.Imbalance(
            balanced_accuracy=imb.balanced_accuracy,
            macro_precision=imb.macro_precision,
            macro_f1=imb.macro_f1,
            buckets=[
                ev_pb2.ClassBucket(
                    name=b.name, num_classes=b.num_classes, num_samples=b.num_samples, accuracy=b.accuracy
                )
                for b in imb.buckets
            ],
            prediction_shift_tv=imb.prediction_shift_tv,
            top_confusions=[
                ev_pb2.ConfusedPair(label=c.label, prediction=c.prediction, count=c.count)
                for c in imb.top_confusions
            ],
            classes_present=imb.classes_present,
            per_class=ev_pb2.PerClass(
                support=imb.per_class.support.tolist(),
                correct=imb.per_class.correct.tolist(),
                predicted=imb.per_class.predicted.tolist(),
                credited=imb.per_class.credited.tolist(),
            ),
        ),
        temperature=ev_pb2.TemperatureScan(
            temperatures=list(temp.temperatures),
            nll=list(temp.nll),
            best_temperature=temp.best_temperature,
            calibrated_nll=temp.calibrated_nll,
            beyond_grid=temp.beyond_grid,
        ),
        metrics=report.scalars(),
        label_tie_share=report.label_tie_share,
        tie_warning_share=TIE_WARNING_SHARE,
    )


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def key_to_pb(key: EvaluationKey) -> ev_pb2.EvaluationKey:
    return ev_pb2.EvaluationKey(run=key.run, model=key.model, split=key.split, step=key.step)


def evaluation_to_pb(
    row: EvaluationRow, include_result: bool = True, per_class: bool = False
) -> ev_pb2.Evaluation:
    """The ``Evaluation`` message of a stored row; per-class counts only when asked for."""
    out = ev_pb2.Evaluation(
        evaluation_id=row.evaluation_id,
        key=key_to_pb(row.key),
        state=ev_pb2.EVALUATION_STATE_FINALIZED if row.finalized else ev_pb2.EVALUATION_STATE_OPEN,
        world_size=row.world_size,
        ranks_closed=row.ranks_closed,
        num_classes=row.num_classes,
        num_samples=row.num_samples,
        created_at=_timestamp(row.created_at),
        records_available=row.records_available,
        pinned=row.pinned,
    )
    if row.finalized_at is not None:
        out.finalized_at.CopyFrom(_timestamp(row.finalized_at))
    if include_result and row.result is not None:
        out.result.ParseFromString(row.result)
        if not per_class:
            out.result.imbalance.ClearField("per_class")
    return out
