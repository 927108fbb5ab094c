"""compute_metrics: every metric the service reports, from merged per-sample records.

All sums are float64 over the float32 record columns. Nothing depends on the
order of the records beyond float64 rounding (~1e-16 relative per term): the
only order-sensitive step, the equal-mass bins, sorts by (confidence, correct)
first. Definitions, conventions and peers are in docs/metrics.md.
"""

from __future__ import annotations

import numpy as np

from evalstream.service.engine.calibration import calibration
from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.imbalance import imbalance
from evalstream.service.engine.records import Records
from evalstream.service.engine.report import LossSummary, MetricReport
from evalstream.service.engine.temperature import scan_records

# A share of samples whose label's score ties another class's above which an evaluation warns:
# float32 logits of a healthy model almost never tie exactly (well under 0.1% of samples even in
# bfloat16 at 3,000 classes); 1% means saturated, quantized or collapsed scores upstream.
TIE_WARNING_SHARE = 0.01


def running_summary(records: Records) -> tuple[float, int]:
    """(sum of NLL, binary top-1 correct count, argmax == label): cheap live progress while an
    evaluation streams (an integer, so the store keeps exact running counts)."""
    return float(records.nll.sum(dtype=np.float64)), int(np.count_nonzero(records.correct))


def loss_summary(nll32: np.ndarray, credit: np.ndarray) -> LossSummary:
    """Mean NLL, its percentiles (numpy's linear interpolation) and its split by top-1 correctness,
    each sample weighted by its top-1 credit (its expected correctness under random tie-breaking;
    0 or 1 on tie-free samples). A group with no weight has mean 0 and share 0."""
    n = len(nll32)
    if n == 0:
        return LossSummary(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    nll = nll32.astype(np.float64)
    weight = np.asarray(credit, dtype=np.float64)
    total = float(nll.sum())
    right = float((nll * weight).sum())
    wrong = total - right
    n_right = float(weight.sum())
    n_wrong = n - n_right
    p50, p90, p99 = (float(v) for v in np.percentile(nll, [50.0, 90.0, 99.0]))
    return LossSummary(
        mean=total / n,
        p50=p50,
        p90=p90,
        p99=p99,
        mean_correct=right / n_right if n_right else 0.0,
        mean_wrong=wrong / n_wrong if n_wrong else 0.0,
        share_correct=right / total if total > 0 else 0.0,
        share_wrong=wrong / total if total > 0 else 0.0,
    )


def compute_metrics(
    records: Records, num_classes: int, config: EngineConfig, *, dedupe: bool = True
) -> MetricReport:
    """The MetricReport of one evaluation. With ``dedupe`` the first arrival of each sample id counts."""
    # The temperature scan uses the records' own grid: an evaluation begun before a change of the
    # grid (Records.concat) keeps the grid of its legacy parts.
    dropped = 0
    if dedupe:
        records, dropped = records.dedupe()
    n = len(records)
    if n and (int(records.label.max()) >= num_classes or int(records.pred.max()) >= num_classes):
        raise ValueError(f"records hold class indices >= num_classes={num_classes}")
    credit = records.topk_credit(1)
    top_k = {k: (float(records.topk_credit(k).sum()) / n if n else 0.0) for k in sorted(set(config.top_k))}
    return MetricReport(
        num_samples=n,
        num_classes=num_classes,
        duplicates_dropped=dropped,
        loss=loss_summary(records.nll, credit),
        top_k=top_k,
        calibration=calibration(records.confidence, credit, config.num_bins),
        brier=float(records.brier.sum(dtype=np.float64)) / n if n else 0.0,
        entropy=float(records.entropy.sum(dtype=np.float64)) / n if n else 0.0,
        imbalance=imbalance(records.label, records.pred, credit, num_classes, config.top_confusions),
        temperature=scan_records(records),
        label_tie_share=float(np.count_nonzero(records.tied)) / n if n else 0.0,
    )
