"""Every scalar metric the engine reports, with its direction.

The direction (``higher_is_better``) is what ranking, gating and the exporter
rely on; ``None`` marks descriptive numbers that cannot rank models (a mean
confidence is neither good nor bad by itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    higher_is_better: bool | None
    # A fraction in [0, 1] (exported with the Prometheus "_ratio" suffix).
    is_ratio: bool = False


_STATIC: tuple[MetricInfo, ...] = (
    MetricInfo("nll", "Mean negative log-likelihood (cross-entropy, nats)", False),
    MetricInfo("nll_p50", "Median per-sample NLL", False),
    MetricInfo("nll_p90", "90th percentile of per-sample NLL", False),
    MetricInfo("nll_p99", "99th percentile of per-sample NLL", False),
    MetricInfo("nll_correct", "Mean NLL of top-1-correct samples", False),
    MetricInfo("nll_wrong", "Mean NLL of top-1-wrong samples", False),
    MetricInfo("loss_share_wrong", "Share of the total loss from top-1-wrong samples", None, True),
    MetricInfo("ece", "Expected calibration error, L1, equal-width (lo, hi] bins", False, True),
    MetricInfo("rms_ce", "RMS calibration error, L2, equal-width bins", False, True),
    MetricInfo("mce", "Maximum calibration error over non-empty bins", False, True),
    MetricInfo("adaptive_ece", "ECE over equal-mass bins", False, True),
    MetricInfo("mean_confidence", "Mean top-1 confidence", None, True),
    MetricInfo("overconfidence", "Mean top-1 confidence minus top-1 accuracy", None),
    MetricInfo("brier", "Multiclass Brier score, mean of sum_c (p_c - y_c)^2", False),
    MetricInfo("entropy", "Mean predictive entropy (nats)", None),
    MetricInfo("balanced_accuracy", "Mean recall over classes present in the labels", True, True),
    MetricInfo("macro_precision", "Macro precision over classes present or predicted", True, True),
    MetricInfo("macro_f1", "Macro F1 over classes present or predicted", True, True),
    MetricInfo(
        "accuracy_head", "Top-1 accuracy on the most frequent classes (a third of samples)", True, True
    ),
    MetricInfo(
        "accuracy_torso", "Top-1 accuracy on the middle third of samples by class frequency", True, True
    ),
    MetricInfo("accuracy_tail", "Top-1 accuracy on the rarest classes (a third of samples)", True, True),
    MetricInfo(
        "prediction_shift_tv",
        "Total variation distance between label and predicted-class distributions",
        False,
        True,
    ),
    MetricInfo("best_temperature", "Temperature T* minimising NLL (exact, within the grid)", None),
    MetricInfo(
        "temperature_beyond_grid",
        "Where T* lies against the temperature grid: 0 inside; +1 above its highest T (T* > "
        "best_temperature); -1 below its lowest (T* < best_temperature)",
        None,
    ),
    MetricInfo("calibrated_nll", "NLL at the best temperature T*", False),
    MetricInfo(
        "label_tie_share",
        "Share of samples whose label's score exactly equals another class's (heavy ties mean "
        "saturated, quantized or collapsed scores upstream)",
        None,
        True,
    ),
)


def accuracy_name(k: int) -> str:
    return f"accuracy_top{k}"


def metric_infos(top_k: Iterable[int]) -> dict[str, MetricInfo]:
    """All metric descriptions for an engine reporting these top-k accuracies."""
    infos = {
        accuracy_name(k): MetricInfo(accuracy_name(k), f"Top-{k} accuracy", True, True)
        for k in sorted(set(top_k))
    }
    infos.update({m.name: m for m in _STATIC})
    return infos


def direction(name: str, top_k: Iterable[int]) -> bool:
    """higher_is_better for a metric that can rank models; ValueError names the valid ones."""
    infos = metric_infos(top_k)
    info = infos.get(name)
    if info is None or info.higher_is_better is None:
        valid = sorted(n for n, i in infos.items() if i.higher_is_better is not None)
        raise ValueError(f"unknown or non-ranking metric {name!r}; valid: {', '.join(valid)}")
    return info.higher_is_better
