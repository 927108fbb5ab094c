"""The paragraph a person reads first: who is best, whether it is real, why metrics disagree, the gate."""

from __future__ import annotations

from evalstream.service.compare.result import CandidateOutcome, Comparison

CAUSE_WORDS = {
    "confidence_scale": "a confidence-scale gap that temperature scaling closes",
    "confidently_wrong": "confidently wrong errors",
    "overconfident": "overconfidence",
    "majority_bias": "a bias towards frequent classes",
    "unexplained": "no single cause found",
}


def _difference(c: CandidateOutcome) -> str:
    iv = c.interval
    if iv is None:
        return f"{c.name}: not tested (no per-sample records)"
    verdict = "real" if c.distinguishable else "not distinguishable"
    return f"{c.name} {iv.estimate:+.4g} [{iv.lower:+.4g}, {iv.upper:+.4g}] ({verdict})"


def write_verdict(result: Comparison, baseline: str | None) -> str:
    best = result.candidates[0]
    value = best.metrics[result.primary_metric]
    sentences = [f"{best.name} is best by {result.primary_metric} ({value:.4g})."]
    rest = result.candidates[1:]
    if rest:
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
        real = [c for c in rest if c.distinguishable]
        if tested and not real:
            sentences.append(f"No candidate is distinguishable from {best.name} at this level.")
    for d in result.diagnoses:
        causes = ", ".join(CAUSE_WORDS.get(c, c) for c in d.causes)
        sentences.append(
            f"{d.model_a} has the lower loss and {d.model_b} the higher accuracy because of {causes}."
        )
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
