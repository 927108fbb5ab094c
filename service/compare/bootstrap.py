"""Bootstrap confidence intervals for the difference of a metric between candidates and the best.

Paired (candidates share sample ids, records aligned by id): every candidate is
evaluated on the same replicate weights, so the interval is for the difference
on the same resampled samples and the noise common to both models cancels.
Unpaired (no shared ids): each candidate gets its own, independent replicates.

Intervals are percentile intervals of (statistic_c - statistic_best) over the
replicates; the estimate is the difference on the full data. Everything is
seeded: the same seed and replicate count give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evalstream.service.compare.statistics import Columns, Mean, Statistic, paired_difference
from evalstream.service.compare.weights import weight_blocks


@dataclass(frozen=True)
class Interval:
    estimate: float
    lower: float
    upper: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.lower > 0.0 or self.upper < 0.0


def percentile_interval(estimate: float, replicates: npt.NDArray[np.float64], level: float) -> Interval:
    """Equal-tailed percentile interval; NaN replicates (undefined statistic) are ignored."""
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0:
        return Interval(estimate, float("nan"), float("nan"), level)
    alpha = (1.0 - level) / 2.0
    lower, upper = np.quantile(finite, [alpha, 1.0 - alpha])
    return Interval(estimate, float(lower), float(upper), level)


def paired_bootstrap(
    stats: Sequence[Statistic], best: int, n: int, replicates: int, level: float, seed: int
) -> list[Interval]:
    """Interval for stats[i] - stats[best] on shared replicate weights (the best's own is [0, 0])."""
    return paired_intervals(stats, best, n, replicates, level, seed)[0]


def paired_intervals(
    stats: Sequence[Statistic],
    best: int,
    n: int,
    replicates: int,
    level: float,
    seed: int,
    extra: Sequence[npt.NDArray[np.float64]] = (),
) -> tuple[list[Interval], list[Interval]]:
    """``paired_bootstrap``'s intervals, and an interval for the mean of each ``extra`` column.

    Every difference of two means and every extra column share one matrix product per weight
    block (their columns side by side), so further mean statistics cost little beyond the
    weights, which are drawn once for all of them."""
    if n <= 0:
        raise ValueError("paired bootstrap needs at least one common sample")
    direct: dict[int, Mean] = {}
    general: list[int] = []
    for i, s in enumerate(stats):
        if i != best:
            diff = paired_difference(s, stats[best])
            if diff is None:
                general.append(i)
            else:
                direct[i] = diff
    columns = [d.x for d in direct.values()] + [np.asarray(x, dtype=np.float64) for x in extra]
    fused = Columns(np.stack(columns, axis=1)) if columns else None
    means = np.empty((len(columns), replicates))
    values = {i: np.empty(replicates) for i in general}
    done = 0
    for w in weight_blocks(seed, replicates, n) if fused is not None or general else ():
        rows = slice(done, done + len(w))
        if fused is not None:
            means[:, rows] = fused.means(w).T
        if general:  # a general statistic needs the best's own value on the same weights
            base = stats[best].evaluate(w)
            for i in general:
                values[i][rows] = stats[i].evaluate(w) - base
        done += len(w)
    row = {i: r for r, i in enumerate(direct)}
    best_point = stats[best].point(n) if general else 0.0
    out = []
    for i, s in enumerate(stats):
        if i == best:
            out.append(Interval(0.0, 0.0, 0.0, level))
        elif i in direct:
            out.append(percentile_interval(direct[i].point(n), means[row[i]], level))
        else:
            out.append(percentile_interval(s.point(n) - best_point, values[i], level))
    extras = [
        percentile_interval(float(columns[len(direct) + j].mean()), means[len(direct) + j], level)
        for j in range(len(extra))
    ]
    return out, extras


def replicate_values(stat: Statistic, n: int, replicates: int, seed: int) -> npt.NDArray[np.float64]:
    """The statistic on each of ``replicates`` weight rows drawn from ``seed``."""
    out = np.empty(replicates)
    done = 0
    for w in weight_blocks(seed, replicates, n):
        out[done : done + len(w)] = stat.evaluate(w)
        done += len(w)
    return out


def unpaired_bootstrap(
    stats: Sequence[Statistic], sizes: Sequence[int], best: int, replicates: int, level: float, seed: int
) -> list[Interval]:
    """Interval for stats[i] - stats[best] with independent replicates per candidate.

    Candidate i draws from its own stream ``seed + i`` (its position in ``stats``),
    so adding a candidate does not change the others' replicates."""
    draws = [
        replicate_values(s, m, replicates, seed + i)
        for i, (s, m) in enumerate(zip(stats, sizes, strict=True))
    ]
    best_point = stats[best].point(sizes[best])
    out = []
    for i, s in enumerate(stats):
        if i == best:
            out.append(Interval(0.0, 0.0, 0.0, level))
        else:
            out.append(percentile_interval(s.point(sizes[i]) - best_point, draws[i] - draws[best], level))
    return out
