"""The paragraph a person reads first: which model to pick, why metrics disagree, whether it is real.

Order: the recommendation (when "on"); the ranking by the primary metric with
its intervals; the recommendation as advice (when "advisory"); each cause once,
with every model it holds for; the pairs that loss and accuracy rank
differently, grouped by what explains them (so a cause shared by several pairs
is stated once); the gate.
"""

from __future__ import annotations

from evalstream.service.compare.diagnosis import PairDiagnosisResult
from evalstream.service.compare.result import CandidateOutcome, Comparison

# Pair-level causes; per-model ones (under/overconfident, confidently wrong, majority bias,
# low-confidence correct) are stated once in the causes.
PAIR_WORDS = {
    "confidence_scale": "after temperature scaling the more accurate model also has the lower NLL",
    "unexplained": "no cause found in calibration or class balance",
}


def _difference(c: CandidateOutcome) -> str:
    iv = c.interval
    if iv is None:
        return f"{c.name}: not tested (no per-sample records)"
    verdict = "real" if c.distinguishable else "not distinguishable"
    return f"{c.name} {iv.estimate:+.4g} [{iv.lower:+.4g}, {iv.upper:+.4g}] ({verdict})"


def _ranking(result: Comparison, headline: bool) -> list[str]:
    best = result.candidates[0]
    value = best.metrics[result.primary_metric]
    first = (
        f"{best.name} is best by {result.primary_metric} ({value:.4g})."
        if headline
        else f"By {result.primary_metric}, {best.name} ranks first ({value:.4g})."
    )
    sentences = [first]
    rest = result.candidates[1:]
    if not rest:
        return sentences
    tested = [c for c in rest if c.interval is not None]
    if tested:
        how = (
            f"paired on {result.common_samples:,} common samples"
            if result.paired
            else "unpaired bootstrap (no shared sample ids)"
        )
        level = f"{100 * result.confidence_level:g}%"
        sentences.append(
            f"Difference to it, {level} CI, {how}, {result.replicates:,} replicates: "
            + "; ".join(_difference(c) for c in rest)
            + "."
        )
    untested = [c.name for c in rest if c.interval is None]
    if untested:
        sentences.append(
            f"No per-sample records for {', '.join(untested)}"
            + ("" if best.interval is not None else f" or {best.name}")
            + ": ranked on stored metrics only, significance not assessed."
        )
    if tested and not any(c.distinguishable for c in rest):
        sentences.append(
            f"No candidate is distinguishable from {best.name} by {result.primary_metric} at this level."
        )
    return sentences


def _pairs(diagnoses: list[PairDiagnosisResult]) -> list[str]:
    """One sentence per group of disagreeing pairs with the same pair-level causes."""
    groups: dict[tuple[str, ...], list[PairDiagnosisResult]] = {}
    for d in diagnoses:
        key = tuple(c for c in d.causes if c in PAIR_WORDS)
        groups.setdefault(key, []).append(d)
    out = []
    for key, pairs in groups.items():
        listed = ", ".join(f"{d.model_a} (lower loss) vs {d.model_b} (more accurate)" for d in pairs)
        head = "Loss and accuracy disagree for " + listed
        if key:
            out.append(f"{head}: {'; '.join(PAIR_WORDS[c] for c in key)}.")
        else:
            out.append(f"{head}; the causes above account for it.")
    return out


def write_verdict(result: Comparison, baseline: str | None) -> str:
    rec = result.recommendation
    sentences: list[str] = []
    if rec is not None and rec.mode == "on":
        sentences.append(rec.text)
    sentences += _ranking(result, headline=rec is None or rec.mode != "on")
    if rec is not None and rec.mode == "advisory":
        sentences.append(f"Advice: {rec.text}")
    sentences += [c.finding for c in result.causes]
    sentences += _pairs(result.diagnoses)
    gated = [c for c in result.candidates if c.gate is not None]
    if gated:
        passed = [c.name for c in gated if c.gate is not None and c.gate.passed]
        failed = [c.name for c in gated if c.gate is not None and not c.gate.passed]
        parts = []
        if passed:
            parts.append(f"{', '.join(passed)} {'passes' if len(passed) == 1 else 'pass'}")
        if failed:
            parts.append(f"{', '.join(failed)} {'fails' if len(failed) == 1 else 'fail'}")
        sentences.append(f"Gate against {baseline}: {'; '.join(parts)}.")
    return " ".join(sentences)
