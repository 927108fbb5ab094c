"""Ordering candidates: by the primary metric, ties by the secondary, then by name.

Values are oriented by direction first (negated where lower is better), so
"larger is better" everywhere below. A tie is a run of candidates whose
oriented values lie within ``tolerance`` of the run's best; clustering runs
(rather than comparing pairs) keeps the order transitive and deterministic.
Missing or NaN values rank last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def oriented(value: float, higher_is_better: bool) -> float:
    """Value made "larger is better"; NaN becomes -inf so it sorts last."""
    if value is None or math.isnan(value):
        return -math.inf
    return value if higher_is_better else -value


def _clusters(indices: list[int], keys: Sequence[float], tolerance: float) -> list[list[int]]:
    """Indices sorted by key (descending), grouped into runs within tolerance of each run's first."""
    ordered = sorted(indices, key=lambda i: -keys[i])
    groups: list[list[int]] = []
    for i in ordered:
        if groups and (keys[groups[-1][0]] - keys[i] <= tolerance or keys[groups[-1][0]] == keys[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def order_candidates(
    primary: Sequence[float], secondary: Sequence[float], names: Sequence[str], tolerance: float
) -> list[int]:
    """Candidate indices best first; ``primary`` and ``secondary`` already oriented."""
    out: list[int] = []
    for group in _clusters(list(range(len(primary))), primary, tolerance):
        for sub in _clusters(group, secondary, tolerance):
            out.extend(sorted(sub, key=lambda i: names[i]))
    return out


def competition_ranks(values: Sequence[float], tolerance: float) -> list[int]:
    """Rank of each (oriented) value, 1 = best; values within tolerance share the better rank ("1224")."""
    ranks = [0] * len(values)
    position = 1
    for group in _clusters(list(range(len(values))), values, tolerance):
        for i in group:
            ranks[i] = position
        position += len(group)
    return ranks


def display_names(keys: Sequence[tuple[str, str, int]]) -> list[str]:
    """Shortest unambiguous name per (run, model, step): model, else model@step, else run/model@step."""
    for form in (lambda r, m, s: m, lambda r, m, s: f"{m}@{s}", lambda r, m, s: f"{r}/{m}@{s}"):
        names = [form(*k) for k in keys]
        if len(set(names)) == len(names):
            return names
    return [f"{r}/{m}@{s}#{i}" for i, (r, m, s) in enumerate(keys)]
