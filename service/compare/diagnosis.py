"""Why loss and accuracy rank two candidates differently, in numbers.

For a pair where A has the lower loss and B the higher top-1 accuracy, each
possible cause is tested on the metrics (and, when paired, the samples):

- ``confidence_scale``: at each model's best temperature T* the calibrated NLL
  ranks B ahead, so the loss gap is a confidence-scale problem that
  temperature scaling fixes;
- ``low_confidence_correct``: most of B's extra loss is on its correct
  predictions (the loss split; causes.py);
- ``confidently_wrong``: most of B's extra loss is on its errors and B's errors
  carry high confidence (causes.py: mean confidence on wrong predictions, not
  the NLL per error);
- ``underconfident`` / ``overconfident`` / ``majority_bias``: the per-model cause
  holds for B (causes.py), stated here with B's defining number; the numbers
  of every candidate are in the comparison's causes, once.

When none holds the cause is ``unexplained`` and the finding states the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from evalstream.service.compare.causes import LOSS_SPLIT, loss_split
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
    held: Mapping[str, Collection[str]] | None = None,
) -> PairDiagnosisResult:
    """Diagnose a disagreeing pair; (a, b) is reordered so that A has the lower loss.

    ``held``: per-model causes (model -> cause names) found for the whole comparison."""
    if a["nll"] > b["nll"]:
        name_a, a, name_b, b, records_a, records_b = name_b, b, name_a, a, records_b, records_a
    g = lambda m, k: m.get(k, math.nan)  # noqa: E731
    of_b = set((held or {}).get(name_b, ()))
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
    split = loss_split(a, b)
    if split.gap > 0 and split.share_correct >= LOSS_SPLIT:
        causes.append("low_confidence_correct")
        findings.append(
            f"{name_b}'s extra {split.gap:.4f} nats: {split.from_correct:+.4f} on samples it gets right, "
            f"{split.from_wrong:+.4f} on its errors (NLL on correct {g(b, 'nll_correct'):.3f} vs "
            f"{g(a, 'nll_correct'):.3f}): it is right "
            f"{_pt(acc_gap)} more often, with lower confidence."
        )
    elif split.gap > 0 and "confidently_wrong" in of_b:
        causes.append("confidently_wrong")
        findings.append(
            f"{name_b}'s extra {split.gap:.4f} nats: {split.from_wrong:+.4f} on its errors, which carry "
            f"high confidence, {split.from_correct:+.4f} on its correct predictions "
            f"({g(b, 'nll_wrong'):.3f} nats per error vs "
            f"{g(a, 'nll_wrong'):.3f} for {name_a})."
        )
    gap = {n: g(m, "accuracy_top1") - g(m, "balanced_accuracy") for n, m in ((name_a, a), (name_b, b))}
    for cause, words in (
        ("underconfident", f"is under-confident (T*={g(b, 'best_temperature'):.2f})"),
        ("overconfident", f"is over-confident (T*={g(b, 'best_temperature'):.2f})"),
        (
            "majority_bias",
            f"gains accuracy on frequent classes: top-1 minus balanced accuracy {_pt(gap[name_b])} "
            f"vs {_pt(gap[name_a])} for {name_a}",
        ),
    ):
        if cause in of_b:
            causes.append(cause)
            findings.append(f"{name_b} {words}.")
    if not causes:
        causes.append("unexplained")
        findings.append(
            f"{name_a} has the lower loss ({g(a, 'nll'):.4f} vs {g(b, 'nll'):.4f}) and {name_b} the higher "
            f"accuracy (+{_pt(acc_gap)}); neither calibration nor class balance accounts for it."
        )
    pair_flips = flips(records_a, records_b) if records_a is not None and records_b is not None else None
    return PairDiagnosisResult(name_a, name_b, causes, findings, a, b, pair_flips)
