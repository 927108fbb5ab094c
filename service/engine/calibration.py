"""Calibration of the top-1 confidence: equal-width (lo, hi] bins, equal-mass bins, reliability diagram.

Bin edges follow Guo et al. (2017) and ``verified_calibration``: bin b holds
confidences in (b/B, (b+1)/B], and bin 0 also holds 0, so a confidence of
exactly 1.0 lands in the last bin. TorchMetrics instead uses [lo, hi) with an
extra bin for 1.0; the two agree whenever no confidence sits exactly on an edge.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.report import Calibration, ReliabilityBin

BIN_EDGES = "(lo, hi]"


def equal_width_bins(confidence: npt.NDArray[np.float64], num_bins: int) -> npt.NDArray[np.intp]:
    """Bin index of each confidence under the (lo, hi] rule."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # side="left": edges[i-1] < c <= edges[i]  ->  bin i-1.
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)


def adaptive_ece(
    confidence: npt.NDArray[np.float64], correct: npt.NDArray[np.generic], num_bins: int
) -> float:
    """ECE over equal-mass bins: samples sorted by (confidence, correct), split into
    ``num_bins`` runs whose sizes differ by at most one (the first runs take the
    extra samples, as ``numpy.array_split``). Sorting correct after wrong within
    equal confidences makes the result independent of arrival order."""
    n = len(confidence)
    order = np.lexsort((correct, confidence))
    conf_sorted = confidence[order]
    corr_sorted = correct[order].astype(np.float64)
    total = 0.0
    for conf_b, corr_b in zip(
        np.array_split(conf_sorted, num_bins), np.array_split(corr_sorted, num_bins), strict=True
    ):
        if len(conf_b):
            total += abs(float(conf_b.sum()) - float(corr_b.sum()))
    return total / n


def calibration(
    confidence32: npt.NDArray[np.float32], correct: npt.NDArray[np.generic], num_bins: int
) -> Calibration:
    """ECE (L1), RMS (L2), MCE (max over non-empty bins), adaptive ECE and the reliability diagram.

    ``correct`` is each sample's top-1 credit: 0 or 1, or its expectation under random
    tie-breaking where the label tied another class (see ``Records.topk_credit``)."""
    n = len(confidence32)
    conf = confidence32.astype(np.float64)
    corr = correct.astype(np.float64)
    idx = equal_width_bins(conf, num_bins)
    count = np.bincount(idx, minlength=num_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=num_bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=num_bins)
    nonempty = count > 0
    safe = np.maximum(count, 1)
    mean_conf = np.where(nonempty, conf_sum / safe, 0.0)
    acc = np.where(nonempty, corr_sum / safe, 0.0)
    gap = np.abs(mean_conf - acc)
    weight = count / max(n, 1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = [
        ReliabilityBin(
            float(edges[b]), float(edges[b + 1]), int(count[b]), float(mean_conf[b]), float(acc[b])
        )
        for b in range(num_bins)
    ]
    mean_confidence = float(conf.sum() / n) if n else 0.0
    accuracy = float(corr.sum() / n) if n else 0.0
    return Calibration(
        num_bins=num_bins,
        ece=float(np.sum(weight * gap)),
        rms_ce=float(np.sqrt(np.sum(weight * gap * gap))),
        mce=float(gap[nonempty].max()) if nonempty.any() else 0.0,
        adaptive_ece=adaptive_ece(conf, correct, num_bins) if n else 0.0,
        mean_confidence=mean_confidence,
        overconfidence=mean_confidence - accuracy,
        bins=bins,
        bin_edges=BIN_EDGES,
    )
