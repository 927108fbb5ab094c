"""Why loss and accuracy rank two candidates differently, in numbers.

For a pair where A has the lower loss and B the higher top-1 accuracy, each
possible cause is tested on the metrics (and, when paired, the samples):

- ``confidence_scale``: at each model's best temperature T* the calibrated NLL
  ranks B ahead, so the loss gap is a confidence-scale problem that
  temperature scaling fixes;
- ``confidently_wrong``: B pays more loss per error (mean NLL of its top-1-wrong
  samples), so its fewer errors still cost more in total;
- ``overconfident``: B's mean confidence exceeds its accuracy by more than A's
  and its ECE is higher;
- ``majority_bias``: B's balanced accuracy is lower: it gains top-1 accuracy on
  frequent classes (head) and loses it on rare ones, predicting frequent classes
  more often than they occur (larger label-vs-prediction distance).

When none holds the cause is ``unexplained`` and the finding states the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from evalstream.service.compare.mcnemar import discordant
from evalstream.service.engine.records import Records


@dataclass(frozen=True)
class FlipCounts:
    a_right_b_wrong: int
    b_right_a_wrong: int
    a_confidence_on_a_wins: float
    b_confidence_on_b_wins: float
    a_confidence_on_b_wins: float
    b_confidence_on_a_wins: float


@dataclass(frozen=True)
class PairDiagnosisResult:
    model_a: str
    model_b: str
    causes: list[str]
    findings: list[str]
    metrics_a: Mapping[str, float]
    metrics_b: Mapping[str, float]
    flips: FlipCounts | None


def disagree(a: Mapping[str, float], b: Mapping[str, float], tolerance: float) -> bool:
    """Loss and top-1 accuracy order the pair in opposite directions (beyond the tolerance)."""
    dn = a.get("nll", math.nan) - b.get("nll", math.nan)
    da = a.get("accuracy_top1", math.nan) - b.get("accuracy_top1", math.nan)
    if math.isnan(dn) or math.isnan(da) or abs(dn) <= tolerance or abs(da) <= tolerance:
        return False
    # Lower loss with lower accuracy, or higher loss with higher accuracy.
    return (dn < 0) == (da < 0)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


def flips(a: Records, b: Records) -> FlipCounts:
    """Samples one model alone gets right, and each model's mean confidence on them."""
    ca, cb = a.correct, b.correct
    a_wins, b_wins = ca & ~cb, cb & ~ca
    n_a, n_b = discordant(ca, cb)
    return FlipCounts(
        a_right_b_wrong=n_a,
        b_right_a_wrong=n_b,
        a_confidence_on_a_wins=_mean(a.confidence[a_wins]),
        b_confidence_on_b_wins=_mean(b.confidence[b_wins]),
        a_confidence_on_b_wins=_mean(a.confidence[b_wins]),
        b_confidence_on_a_wins=_mean(b.confidence[a_wins]),
    )


def _pct(x: float) -> str:
    """A fraction as a percentage."""
    return f"{100.0 * x:.1f}%"


def _pt(x: float) -> str:
    """A difference of fractions in percentage points."""
    return f"{100.0 * x:.1f} pt"


def diagnose(
    name_a: str,
    a: Mapping[str, float],
    name_b: str,
    b: Mapping[str, float],
    records_a: Records | None = None,
    records_b: Records | None = None,
) -> PairDiagnosisResult:
    """Diagnose a disagreeing pair; (a, b) is reordered so that A has the lower loss."""
    if a["nll"] > b["nll"]:
        name_a, a, name_b, b, records_a, records_b = name_b, b, name_a, a, records_b, records_a
    g = lambda m, k: m.get(k, math.nan)  # noqa: E731
    causes: list[str] = []
    findings: list[str] = []
    acc_gap = g(b, "accuracy_top1") - g(a, "accuracy_top1")
    loss_gap = g(b, "nll") - g(a, "nll")
    if g(b, "calibrated_nll") < g(a, "calibrated_nll"):
        causes.append("confidence_scale")
        findings.append(
            f"{name_b}'s loss is {loss_gap:.4f} nats higher than {name_a}'s at T=1, but at their best "
            f"temperatures (T*={g(b, 'best_temperature'):.2f} vs {g(a, 'best_temperature'):.2f}) its NLL "
            f"is {g(b, 'calibrated_nll'):.4f} vs {g(a, 'calibrated_nll'):.4f}: the loss gap is a "
            f"confidence-scale problem that temperature scaling fixes."
        )
    if g(b, "nll_wrong") > g(a, "nll_wrong"):
        causes.append("confidently_wrong")
        findings.append(
            f"{name_b} is right {_pt(acc_gap)} more often but pays {g(b, 'nll_wrong'):.3f} nats per error "
            f"vs {g(a, 'nll_wrong'):.3f} for {name_a}; errors make {_pct(g(b, 'loss_share_wrong'))} of its "
            f"loss vs {_pct(g(a, 'loss_share_wrong'))}."
        )
    if g(b, "overconfidence") > g(a, "overconfidence") and g(b, "ece") > g(a, "ece"):
        causes.append("overconfident")
        findings.append(
            f"{name_b} is more overconfident: mean confidence exceeds accuracy by "
            f"{_pt(g(b, 'overconfidence'))} vs {_pt(g(a, 'overconfidence'))}, ECE {g(b, 'ece'):.4f} "
            f"vs {g(a, 'ece'):.4f}."
        )
    if g(b, "balanced_accuracy") < g(a, "balanced_accuracy"):
        causes.append("majority_bias")
        findings.append(
            f"{name_b} gains {_pt(acc_gap)} top-1 accuracy but loses "
            f"{_pt(g(a, 'balanced_accuracy') - g(b, 'balanced_accuracy'))} balanced accuracy: head "
            f"{_pct(g(b, 'accuracy_head'))} vs {_pct(g(a, 'accuracy_head'))}, tail "
            f"{_pct(g(b, 'accuracy_tail'))} vs {_pct(g(a, 'accuracy_tail'))}, label-vs-prediction distance "
            f"{g(b, 'prediction_shift_tv'):.3f} vs {g(a, 'prediction_shift_tv'):.3f}: it predicts "
            f"frequent classes more often."
        )
    if not causes:
        causes.append("unexplained")
        findings.append(
            f"{name_a} has the lower loss ({g(a, 'nll'):.4f} vs {g(b, 'nll'):.4f}) and {name_b} the higher "
            f"accuracy (+{_pt(acc_gap)}); neither calibration nor class balance accounts for it."
        )
    pair_flips = flips(records_a, records_b) if records_a is not None and records_b is not None else None
    return PairDiagnosisResult(name_a, name_b, causes, findings, a, b, pair_flips)
