"""The model to pick, in one or two sentences: the primary ranking checked against temperature scaling.

A model is deployed with a temperature, so what matters after deployment is its
NLL at its own best temperature T* (the calibrated NLL), not its NLL at T = 1.
The rule (docs/compare.md, "Recommendation"), with P the best by the primary
metric and K the best by calibrated NLL:

1. P = K: recommend P when any difference to it is significant (by the primary
   metric or by calibrated NLL), else no model is distinguishable.
2. P != K (the rankings disagree): recommend K, with its T*, when its calibrated
   NLL lead over P is significant (paired bootstrap on calibrated NLL at each
   model's own T*); else recommend P when P is distinguishable from K by the
   primary metric; else neither can be recommended over the other.

Whenever top-1 accuracy names the same best as calibrated NLL against the
primary metric, the text says so. Significance is the comparison's bootstrap at
its confidence level; without per-sample records calibrated NLL is not tested
and only the primary ranking can decide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from evalstream.service.compare.bootstrap import Interval

MODES = ("off", "advisory", "on")


@dataclass
class RecommendationResult:
    mode: str
    index: int | None  # candidate index of the recommended model, None when none
    model: str
    basis: str  # "primary" | "calibrated_nll" | "none"
    temperature: float
    text: str
    rankings_disagree: bool
    accuracy_agrees: bool
    calibrated_best: str
    # other candidate -> interval of (its calibrated NLL - the calibrated best's)
    calibrated_differences: dict[str, Interval] = field(default_factory=dict)


def _argbest(values: Sequence[float], order: Sequence[int], lower: bool) -> int | None:
    """Best finite value; ties go to the earlier candidate in the primary order."""
    finite = [i for i in order if math.isfinite(values[i])]
    if not finite:
        return None
    return min(finite, key=lambda i: (values[i] if lower else -values[i], order.index(i)))


def _at(metrics: Mapping[str, float]) -> str:
    """The temperature to deploy at; where the optimum lies beyond the grid, the grid's end and the
    bound ("T* > 20"), never the end as if it were T*."""
    t = metrics.get("best_temperature", math.nan)
    if not math.isfinite(t):
        return "T=1 (no T* known)"
    side = metrics.get("temperature_beyond_grid", 0.0)
    if side:
        return f"T={t:.2f} (T* {'>' if side > 0 else '<'} {t:.4g}, beyond the temperature grid)"
    return f"T={t:.2f}"


def _iv(iv: Interval) -> str:
    return f"{iv.estimate:+.4f} [{iv.lower:+.4f}, {iv.upper:+.4f}]"


def _names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def recommend(
    mode: str,
    names: Sequence[str],
    metrics: Sequence[Mapping[str, float]],
    order: Sequence[int],
    primary: str,
    distinguishable: Mapping[int, bool],
    calibrated: Mapping[int, Interval],
    calibrated_best: int | None,
) -> RecommendationResult | None:
    """The recommendation under ``mode`` (None when "off").

    ``distinguishable[i]``: candidate i's primary-metric interval to P excludes 0 (tested ones only).
    ``calibrated[i]``: interval of calibrated NLL (i - K) for every other tested candidate, K =
    ``calibrated_best``; empty when calibrated NLL could not be tested."""
    if mode == "off":
        return None
    p = order[0]
    cal = [m.get("calibrated_nll", math.nan) for m in metrics]
    acc = [m.get("accuracy_top1", math.nan) for m in metrics]
    k = calibrated_best if calibrated_best is not None else _argbest(cal, order, lower=True)
    a = _argbest(acc, order, lower=False)
    k_name = names[k] if k is not None else ""
    diffs = {names[i]: iv for i, iv in calibrated.items()}
    disagree = k is not None and k != p
    accuracy_agrees = disagree and a == k

    def result(index: int | None, basis: str, text: str) -> RecommendationResult:
        return RecommendationResult(
            mode=mode,
            index=index,
            model=names[index] if index is not None else "",
            basis=basis,
            temperature=metrics[index].get("best_temperature", math.nan) if index is not None else math.nan,
            text=text,
            rankings_disagree=disagree,
            accuracy_agrees=accuracy_agrees,
            calibrated_best=k_name,
            calibrated_differences=diffs,
        )

    if len(names) == 1:
        return result(
            p, "primary", f"Only one candidate: {names[p]}; deploy it at {_at(metrics[p])} (its T*)."
        )
    cal_real = {i for i, iv in calibrated.items() if iv.excludes_zero}
    untested = "" if calibrated else " Calibrated NLL was not tested (per-sample records are missing)."
    if not disagree:
        real = sorted({i for i, d in distinguishable.items() if d} | cal_real, key=order.index)
        if not real:
            return result(
                None,
                "none",
                f"No model is distinguishable: no difference by {primary} or, after temperature scaling, by "
                f"calibrated NLL is significant.{untested}",
            )
        text = (
            f"Pick {names[p]} (deploy at {_at(metrics[p])}): it is best by {primary} and after temperature "
            f"scaling (calibrated NLL {cal[p]:.4f})"
        )
        if a is not None and a != p:
            text += f", though {names[a]} is more accurate ({100 * acc[a]:.1f}% vs {100 * acc[p]:.1f}% top-1)"
        text += "."
        tied = [names[i] for i in order[1:] if i not in real]
        if tied:
            text += f" {_names(tied)} {'is' if len(tied) == 1 else 'are'} not distinguishable from it."
        return result(p, "primary", text + untested)
    assert k is not None
    if p in cal_real:
        iv = calibrated[p]
        text = (
            f"Pick {names[k]} at {_at(metrics[k])}: ranked by {primary}, {names[p]} is first, but after "
            f"temperature scaling {names[k]} is best by a significant margin (calibrated NLL {cal[k]:.4f} vs "
            f"{cal[p]:.4f}; {names[p]} - {names[k]} = {_iv(iv)})"
        )
        if accuracy_agrees:
            text += f", and it is also the most accurate ({100 * acc[k]:.1f}% vs {100 * acc[p]:.1f}% top-1)"
        text += "."
        tied = [names[i] for i in order if i not in (k, p) and i in calibrated and i not in cal_real]
        if tied:
            verb = "is" if len(tied) == 1 else "are"
            text += f" {_names(tied)} {verb} not distinguishable from it after scaling."
        return result(k, "calibrated_nll", text)
    also = (
        f" Top-1 accuracy also favours {names[k]} ({100 * acc[k]:.1f}% vs {100 * acc[p]:.1f}%)."
        if accuracy_agrees
        else ""
    )
    not_sig = (
        f"the difference is not significant ({names[p]} - {names[k]} = {_iv(calibrated[p])})"
        if p in calibrated
        else "the difference was not tested"
    )
    if distinguishable.get(k, False):
        return result(
            p,
            "primary",
            f"Pick {names[p]} (deploy at {_at(metrics[p])}): it is best by {primary}; after temperature "
            f"scaling {names[k]} has the lower NLL ({cal[k]:.4f} vs {cal[p]:.4f}) but {not_sig}."
            + also
            + untested,
        )
    return result(
        None,
        "none",
        f"No model can be recommended over the others: {names[p]} is best by {primary} and {names[k]} after "
        f"temperature scaling, and neither lead is significant ("
        + (
            f"calibrated NLL {names[p]} - {names[k]} = {_iv(calibrated[p])}"
            if p in calibrated
            else "not tested"
        )
        + f").{also}{untested}",
    )
