"""compare_models: validate, align, rank, test, gate, diagnose; the numbers of CompareModels."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evalstream.service.compare.agreement import kendall_tau_b
from evalstream.service.compare.align import Aligned, align
from evalstream.service.compare.bootstrap import Interval, paired_intervals, unpaired_bootstrap
from evalstream.service.compare.explain import explain
from evalstream.service.compare.gate import GateSpec, evaluate_gate
from evalstream.service.compare.inputs import CandidateInput, CompareError, CompareOptions
from evalstream.service.compare.mcnemar import discordant, mcnemar_exact
from evalstream.service.compare.ranking import competition_ranks, display_names, order_candidates, oriented
from evalstream.service.compare.recommend import MODES
from evalstream.service.compare.result import CandidateOutcome, Comparison
from evalstream.service.compare.statistics import Mean, Statistic, statistic_for
from evalstream.service.compare.temperature import sample_nll_at
from evalstream.service.compare.verdict import write_verdict
from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.records import Records
from evalstream.service.engine.registry import MetricInfo, direction, metric_infos


def _direction(name: str, config: EngineConfig, role: str) -> bool:
    try:
        return direction(name, config.top_k)
    except ValueError as err:
        raise CompareError("INVALID_ARGUMENT", f"{role} metric: {err}") from None


def _validate(
    candidates: Sequence[CandidateInput], everyone: Sequence[CandidateInput], options: CompareOptions
) -> None:
    if not candidates:
        raise CompareError("INVALID_ARGUMENT", "no candidates to compare: name evaluations or a run")
    ids = [c.evaluation_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise CompareError("INVALID_ARGUMENT", f"a candidate is named twice: {sorted(ids)}")
    if options.replicates < 1:
        raise CompareError("INVALID_ARGUMENT", f"bootstrap replicates must be >= 1, got {options.replicates}")
    if not 0.0 < options.confidence_level < 1.0:
        raise CompareError(
            "INVALID_ARGUMENT", f"confidence level must be in (0, 1), got {options.confidence_level}"
        )
    if options.recommendation not in MODES:
        raise CompareError(
            "INVALID_ARGUMENT",
            f"recommendation must be one of {', '.join(MODES)}, got {options.recommendation!r}",
        )
    for attr, what in (("split", "split"), ("num_classes", "class count")):
        values = {getattr(c, attr) for c in everyone}
        if len(values) > 1:
            detail = ", ".join(f"{c.model}@{c.step}: {getattr(c, attr)}" for c in everyone)
            raise CompareError("FAILED_PRECONDITION", f"candidates differ in {what} ({detail})")


def _gate_spec(options: CompareOptions, infos: dict[str, MetricInfo]) -> GateSpec | None:
    gate = options.gate
    if gate is None:
        return None
    for name in [*gate.upper_bounds, *gate.lower_bounds]:
        if name not in infos:
            raise CompareError(
                "INVALID_ARGUMENT",
                f"gate bound on unknown metric {name!r}; valid: {', '.join(sorted(infos))}",
            )
    return GateSpec(
        gate.min_absolute_improvement,
        gate.min_relative_improvement,
        dict(gate.upper_bounds),
        dict(gate.lower_bounds),
    )


@dataclass
class Significance:
    """Primary-metric intervals to the best and McNemar p-values, and calibrated-NLL intervals to
    the best by calibrated NLL (``calibrated_best``), by candidate index; empty where not computed."""

    intervals: dict[int, Interval] = field(default_factory=dict)
    pvalues: dict[int, float] = field(default_factory=dict)
    calibrated: dict[int, Interval] = field(default_factory=dict)
    calibrated_best: int | None = None


def _calibrated_best(metrics: Sequence[Mapping[str, float]], order: Sequence[int]) -> int | None:
    finite = [i for i in order if math.isfinite(metrics[i].get("calibrated_nll", math.nan))]
    return min(finite, key=lambda i: (metrics[i]["calibrated_nll"], order.index(i))) if finite else None


def _significance(
    aligned: Aligned,
    metrics: Sequence[Mapping[str, float]],
    order: list[int],
    count: int,
    num_classes: int,
    options: CompareOptions,
) -> Significance:
    """Bootstrap intervals of the primary metric (to the best) and of calibrated NLL at each model's
    own T* (to the best by calibrated NLL), on the same replicates when paired; McNemar when paired."""
    out = Significance(calibrated_best=_calibrated_best(metrics, order))
    best, k = order[0], out.calibrated_best
    records = aligned.records
    with_records = [i for i in range(count) if records[i] is not None]
    if len(with_records) < 2:
        return out
    config = options.engine()
    found_stats = [
        statistic_for(options.primary_metric, records[i], num_classes, config)  # type: ignore[arg-type]
        for i in (with_records if records[best] is not None else [])
    ]
    # None: the primary metric is not tested (no records for the best, or no weighted form).
    stats = [s for s in found_stats if s is not None] if found_stats and None not in found_stats else None
    # Calibrated NLL, sample by sample, at each model's own T*.
    cal_others = []
    cal: dict[int, np.ndarray] = {}
    if k is not None and records[k] is not None and options.recommendation != "off":
        cal = {i: sample_nll_at(records[i], metrics[i]["best_temperature"]) for i in with_records}  # type: ignore[arg-type]
        cal_others = [i for i in with_records if i != k]
    pos = with_records.index(best) if best in with_records else 0
    level, reps, seed = options.confidence_level, options.replicates, options.seed
    if aligned.paired:
        primary, extra = paired_intervals(
            stats or [],
            pos,
            aligned.common_samples,
            reps,
            level,
            seed,
            [cal[i] - cal[k] for i in cal_others],  # type: ignore[index]
        )
        if stats is not None:
            out.intervals = dict(zip(with_records, primary, strict=True))
        out.calibrated = dict(zip(cal_others, extra, strict=True))
        for i in with_records:
            if i != best and records[best] is not None:
                b, c = discordant(records[best].correct, records[i].correct)  # type: ignore[union-attr]
                out.pvalues[i] = mcnemar_exact(b, c)
        return out
    sizes = [len(records[i]) for i in with_records]  # type: ignore[arg-type]
    if stats is not None:
        found = unpaired_bootstrap(stats, sizes, pos, reps, level, seed)
        out.intervals = dict(zip(with_records, found, strict=True))
    if cal:
        means: list[Statistic] = [Mean(cal[i]) for i in with_records]
        found = unpaired_bootstrap(means, sizes, with_records.index(k), reps, level, seed)  # type: ignore[arg-type]
        out.calibrated = {i: iv for i, iv in zip(with_records, found, strict=True) if i != k}
    return out


def _agreements(
    metrics: list[dict[str, float]], names: Sequence[str], config: EngineConfig
) -> list[tuple[str, str, float]]:
    infos = metric_infos(config.top_k)
    usable = [
        m
        for m in names
        if m in infos and infos[m].higher_is_better is not None and all(m in row for row in metrics)
    ]
    out = []
    for i, a in enumerate(usable):
        for b in usable[i + 1 :]:
            xa = [oriented(row[a], direction(a, config.top_k)) for row in metrics]
            xb = [oriented(row[b], direction(b, config.top_k)) for row in metrics]
            tau = kendall_tau_b(xa, xb)
            if tau is not None:
                out.append((a, b, tau))
    return out


def _baseline_view(
    baseline: CandidateInput | None,
    aligned: Aligned,
    ids: list[str],
    extra: list[CandidateInput],
    count: int,
    names: list[str],
) -> tuple[str, Records | None, int | None] | None:
    """(name, aligned records, candidate index or None) of the gate's baseline."""
    if baseline is None:
        return None
    if not extra:
        i = ids.index(baseline.evaluation_id)
        return names[i], aligned.records[i], i
    return f"{baseline.model}@{baseline.step} (baseline)", aligned.records[count], None


def compare(
    candidates: Sequence[CandidateInput], options: CompareOptions, baseline: CandidateInput | None = None
) -> Comparison:
    """The comparison as dataclasses (``compare_models`` returns it as the proto response)."""
    config = options.engine()
    infos = metric_infos(config.top_k)
    higher = _direction(options.primary_metric, config, "primary")
    secondary_higher = _direction(options.secondary_metric, config, "secondary")
    spec = _gate_spec(options, infos)
    if spec is not None and baseline is None:
        raise CompareError("INVALID_ARGUMENT", "a gate needs a baseline evaluation")
    ids = [c.evaluation_id for c in candidates]
    extra = [] if baseline is None or baseline.evaluation_id in ids else [baseline]
    everyone = [*candidates, *extra]
    _validate(candidates, everyone, options)
    aligned = align(everyone, config)
    count = len(candidates)
    metrics = aligned.metrics[:count]
    for c, m in zip(candidates, metrics, strict=True):
        if not math.isfinite(m.get(options.primary_metric, math.nan)):
            raise CompareError(
                "FAILED_PRECONDITION", f"{c.model}@{c.step} has no value for {options.primary_metric}"
            )
    names = display_names([(c.run, c.model, c.step) for c in candidates])
    primary = [oriented(m[options.primary_metric], higher) for m in metrics]
    secondary = [oriented(m.get(options.secondary_metric, math.nan), secondary_higher) for m in metrics]
    order = order_candidates(primary, secondary, names, options.tie_tolerance)
    best = order[0]
    sig = _significance(aligned, metrics, order, count, candidates[0].num_classes, options)
    intervals, pvalues = sig.intervals, sig.pvalues

    ranking = [n for n, i in infos.items() if i.higher_is_better is not None and all(n in m for m in metrics)]
    ranks = {
        n: competition_ranks(
            [oriented(m[n], bool(infos[n].higher_is_better)) for m in metrics], options.tie_tolerance
        )
        for n in ranking
    }
    base_metrics = None
    if baseline is not None:
        base_metrics = aligned.metrics[ids.index(baseline.evaluation_id) if not extra else count]
    outcomes = []
    for position, i in enumerate(order, start=1):
        c, m = candidates[i], metrics[i]
        interval = intervals.get(i)
        outcomes.append(
            CandidateOutcome(
                run=c.run,
                model=c.model,
                split=c.split,
                step=c.step,
                evaluation_id=c.evaluation_id,
                name=names[i],
                rank=position,
                metrics=m,
                delta_to_best={k: v - metrics[best][k] for k, v in m.items() if k in metrics[best]},
                rank_by_metric={n: ranks[n][i] for n in ranking},
                interval=interval,
                distinguishable=i != best and interval is not None and interval.excludes_zero,
                mcnemar_p=pvalues.get(i),
                samples_used=aligned.samples_used[i],
                gate=None
                if spec is None or base_metrics is None
                else evaluate_gate(spec, options.primary_metric, higher, m, base_metrics),
            )
        )
    explained = explain(
        names,
        metrics,
        aligned.records[:count],
        order,
        options,
        sig.calibrated,
        sig.calibrated_best,
        {i: c.distinguishable for i, c in zip(order, outcomes, strict=True) if c.interval is not None},
        paired=aligned.paired,
        baseline=_baseline_view(baseline, aligned, ids, extra, count, names),
        num_classes=candidates[0].num_classes,
    )
    result = Comparison(
        primary_metric=options.primary_metric,
        higher_is_better=higher,
        candidates=outcomes,
        paired=aligned.paired,
        common_samples=aligned.common_samples,
        replicates=options.replicates,
        seed=options.seed,
        confidence_level=options.confidence_level,
        diagnoses=explained.diagnoses,
        agreements=_agreements(metrics, options.agreement_metrics, config) if count >= 2 else [],
        recommendation=explained.recommendation,
        causes=explained.causes,
        class_regressions=explained.class_regressions,
    )
    result.verdict = write_verdict(result, baseline.model if baseline is not None else None)
    return result
