"""Causes of disagreement between metrics, each defined by one number and a documented threshold.

A cause holds for a model when its number crosses the threshold; it is stated
once for every model it holds for (never once per pair), with the number of
every candidate beside it, so a reader can check it. Definitions (docs/compare.md):

- ``underconfident`` / ``overconfident``: the model's best temperature T* lies
  below 1 / TEMPERATURE_MARGIN or above TEMPERATURE_MARGIN: its probabilities
  need sharpening (T* < 1) or softening (T* > 1) to minimise NLL;
- ``confidently_wrong``: the mean top-1 confidence on the model's wrong
  predictions is at least CONFIDENT_ERROR: when it errs it puts most of its
  probability on the wrong class (a higher NLL per error alone is not enough:
  an under-confident model also pays a lot per error while being unsure);
- ``low_confidence_correct``: for a pair where the lower-loss model is the less
  accurate, at least LOSS_SPLIT of the other's extra loss comes from its correct
  predictions (loss split: mean over all samples of NLL x correct), i.e. it is
  right but with low confidence;
- ``majority_bias``: the model's top-1 minus balanced accuracy exceeds the median
  of the other candidates' by at least MAJORITY_GAP: its accuracy is carried by
  frequent classes, whether or not it is the more accurate model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evalstream.service.engine.records import Records

TEMPERATURE_MARGIN = 1.1
CONFIDENT_ERROR = 0.5
LOSS_SPLIT = 0.5
MAJORITY_GAP = 0.03


@dataclass(frozen=True)
class Cause:
    """One cause, the candidates it holds for, and the defining number of every candidate."""

    name: str
    models: list[str]
    quantity: str
    values: dict[str, float]
    threshold: float
    finding: str


@dataclass(frozen=True)
class LossSplit:
    """Where the loss gap of a pair comes from: B's extra loss (nats) on correct and on wrong samples."""

    gap: float
    from_correct: float
    from_wrong: float

    @property
    def share_correct(self) -> float:
        return self.from_correct / self.gap if self.gap > 0 else math.nan


@dataclass
class ModelFacts:
    """What the causes read about one candidate."""

    name: str
    metrics: Mapping[str, float]
    wrong_confidence: float = math.nan  # mean top-1 confidence on wrong predictions
    extra: dict[str, float] = field(default_factory=dict)


def _g(m: Mapping[str, float], key: str) -> float:
    return float(m.get(key, math.nan))


def wrong_confidence(records: Records | None) -> float:
    """Mean top-1 confidence on the wrong predictions (NaN without records or errors); each sample
    weighs 1 - its top-1 credit, as the engine splits the loss (a tied label is partly wrong)."""
    if records is None:
        return math.nan
    wrong = 1.0 - records.topk_credit(1)
    total = float(wrong.sum())
    return float((records.confidence.astype(np.float64) * wrong).sum() / total) if total > 0 else math.nan


def loss_split(a: Mapping[str, float], b: Mapping[str, float]) -> LossSplit:
    """B's loss minus A's, split into the part on correct and on wrong samples (both per sample)."""
    acc_a, acc_b = _g(a, "accuracy_top1"), _g(b, "accuracy_top1")
    on_right = _g(b, "nll_correct") * acc_b - _g(a, "nll_correct") * acc_a
    on_wrong = _g(b, "nll_wrong") * (1 - acc_b) - _g(a, "nll_wrong") * (1 - acc_a)
    return LossSplit(_g(b, "nll") - _g(a, "nll"), on_right, on_wrong)


def sentence(text: str) -> str:
    """Capitalise a sentence that starts with "all", "both" or "the" (never a model's own name)."""
    return text[0].upper() + text[1:] if text.startswith(("all ", "both ", "the ")) else text


def names_text(names: Sequence[str], total: int) -> str:
    """'a', 'a and b', 'a, b and c'; 'all three' when every one of several candidates is named."""
    if total > 2 and len(names) == total:
        return {3: "all three", 4: "all four", 5: "all five"}.get(total, f"all {total}")
    if total == 2 and len(names) == 2:
        return "both"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _values(facts: Sequence[ModelFacts], number: Mapping[str, float]) -> dict[str, float]:
    return {f.name: number[f.name] for f in facts if math.isfinite(number[f.name])}


def _list(values: Mapping[str, float], names: Sequence[str], fmt: str, named: bool = False) -> str:
    """'a 0.31, b 0.42' (one name, unless ``named``: the value alone)."""
    shown = [n for n in names if n in values]
    if len(shown) == 1 and not named:
        return fmt.format(values[shown[0]])
    return ", ".join(f"{n} " + fmt.format(values[n]) for n in shown)


def _temperatures(facts: Sequence[ModelFacts], names: Sequence[str]) -> str:
    """T* of each named model as text; one beyond the grid as its bound ("< 0.05", "> 20")."""
    shown = {}
    for f in facts:
        t, side = _g(f.metrics, "best_temperature"), _g(f.metrics, "temperature_beyond_grid")
        if f.name in names and math.isfinite(t):
            shown[f.name] = f"{'>' if side > 0 else '<'} {t:.4g}" if side in (1.0, -1.0) else f"{t:.2f}"
    if len(shown) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{n} {v}" for n, v in shown.items())


def temperature_causes(facts: Sequence[ModelFacts]) -> list[Cause]:
    """underconfident / overconfident from each model's T*."""
    t = {f.name: _g(f.metrics, "best_temperature") for f in facts}
    gain = {f.name: _g(f.metrics, "nll") - _g(f.metrics, "calibrated_nll") for f in facts}
    values = _values(facts, t)
    out = []
    for name, holds, limit, word in (
        ("underconfident", lambda x: x < 1 / TEMPERATURE_MARGIN, 1 / TEMPERATURE_MARGIN, "under"),
        ("overconfident", lambda x: x > TEMPERATURE_MARGIN, TEMPERATURE_MARGIN, "over"),
    ):
        models = [n for n, v in values.items() if holds(v)]
        if not models:
            continue
        sign = "<" if word == "under" else ">"
        who = names_text(models, len(facts))
        one = len(models) == 1
        finding = (
            f"{who} {'is' if one else 'are'} {word}-confident: T* {_temperatures(facts, models)} "
            f"({sign} {limit:.2f}); temperature scaling lowers {'its' if one else 'their'} NLL by "
            f"{_list(gain, models, '{:.3f}')} nats."
        )
        out.append(Cause(name, models, "best_temperature", values, limit, sentence(finding)))
    return out


def confidently_wrong(facts: Sequence[ModelFacts]) -> Cause | None:
    """Models whose wrong predictions carry a mean top-1 confidence of CONFIDENT_ERROR or more."""
    values = _values(facts, {f.name: f.wrong_confidence for f in facts})
    models = [n for n, v in values.items() if v >= CONFIDENT_ERROR]
    if not models:
        return None
    others = [n for n in values if n not in models]
    share = {f.name: _g(f.metrics, "loss_share_wrong") for f in facts}
    one = len(models) == 1
    finding = (
        f"{names_text(models, len(facts))} {'errs' if one else 'err'} with high confidence: mean top-1 "
        f"confidence on wrong predictions {_list(values, models, '{:.2f}')} (>= {CONFIDENT_ERROR:.2f}"
        + (f"; {_list(values, others, '{:.2f}', named=True)}" if others else "")
        + f"); errors make {_list({k: 100 * v for k, v in share.items()}, models, '{:.0f}%')} of "
        + ("its" if one else "their")
        + " loss."
    )
    return Cause(
        "confidently_wrong", models, "mean_confidence_wrong", values, CONFIDENT_ERROR, sentence(finding)
    )


def majority_bias(facts: Sequence[ModelFacts]) -> Cause | None:
    """Models whose top-1 minus balanced accuracy exceeds the others' median by MAJORITY_GAP or more."""
    gap = {f.name: _g(f.metrics, "accuracy_top1") - _g(f.metrics, "balanced_accuracy") for f in facts}
    values = _values(facts, gap)
    if len(values) < 2:
        return None
    models = [
        n
        for n, v in values.items()
        if v - float(np.median([w for m, w in values.items() if m != n])) >= MAJORITY_GAP
    ]
    if not models:
        return None
    by = {f.name: f.metrics for f in facts}
    rest = [n for n in values if n not in models]
    details = "; ".join(
        f"{n}: head {100 * _g(by[n], 'accuracy_head'):.0f}% vs tail {100 * _g(by[n], 'accuracy_tail'):.0f}% "
        f"accuracy, prediction shift (TV) {_g(by[n], 'prediction_shift_tv'):.3f}"
        for n in models
    )
    finding = (
        f"{names_text(models, len(facts))}'s accuracy is carried by frequent classes: top-1 minus balanced "
        f"accuracy {_list({k: 100 * v for k, v in values.items()}, models, '{:.1f} pt')} vs "
        f"{_list({k: 100 * v for k, v in values.items()}, rest, '{:.1f} pt', named=True)} "
        f"(margin >= {100 * MAJORITY_GAP:.0f} pt over the others' median); {details}."
    )
    return Cause(
        "majority_bias", models, "top1_minus_balanced_accuracy", values, MAJORITY_GAP, sentence(finding)
    )


def low_confidence_correct(
    pairs: Sequence[tuple[str, Mapping[str, float], str, Mapping[str, float]]],
) -> Cause | None:
    """For (A lower loss, B higher accuracy) pairs: B's extra loss comes mostly from correct predictions."""
    values: dict[str, float] = {}
    held: list[tuple[str, str, LossSplit]] = []
    for name_a, a, name_b, b in pairs:
        split = loss_split(a, b)
        key = f"{name_b} vs {name_a}"
        values[key] = split.share_correct
        if split.gap > 0 and split.share_correct >= LOSS_SPLIT:
            held.append((name_a, name_b, split))
    if not held:
        return None
    parts = "; ".join(
        f"{b} vs {a}: {s.from_correct:+.3f} nats on correct predictions, {s.from_wrong:+.3f} on errors"
        for a, b, s in held
    )
    models = list(dict.fromkeys(b for _, b, _ in held))
    finding = (
        f"the more accurate model's extra loss comes from correct predictions made with low confidence "
        f"(at least {100 * LOSS_SPLIT:.0f}% of the loss gap on correct samples): {parts}."
    )
    return Cause(
        "low_confidence_correct", models, "loss_gap_share_correct", values, LOSS_SPLIT, sentence(finding)
    )


def model_causes(facts: Sequence[ModelFacts]) -> list[Cause]:
    """Every per-model cause that holds for at least one candidate."""
    out = temperature_causes(facts)
    for found in (confidently_wrong(facts), majority_bias(facts)):
        if found is not None:
            out.append(found)
    return out
