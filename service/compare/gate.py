"""Model-validation gating, as TFMA's and MLflow's: a candidate must beat a baseline by a
margin on the primary metric and stay within bounds on others.

Improvement is sign-adjusted by the primary metric's direction (positive =
better). With both margins at zero (the proto default) a candidate passes the
primary check when it is not worse than the baseline. Point estimates are gated,
as in those tools; whether a difference is real is reported separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GateSpec:
    """The thresholds of a ``compare_pb2.Gate``, free of protobuf."""

    min_absolute_improvement: float = 0.0
    min_relative_improvement: float = 0.0
    upper_bounds: Mapping[str, float] = field(default_factory=dict)
    lower_bounds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    reasons: list[str]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def evaluate_gate(
    spec: GateSpec,
    primary: str,
    higher_is_better: bool,
    candidate: Mapping[str, float],
    baseline: Mapping[str, float],
) -> GateOutcome:
    """Pass/fail with one reason per failed check (empty when passed)."""
    reasons: list[str] = []
    value, base = candidate.get(primary, math.nan), baseline.get(primary, math.nan)
    if math.isnan(value) or math.isnan(base):
        reasons.append(f"{primary} is missing for the candidate or the baseline")
    else:
        improvement = (value - base) if higher_is_better else (base - value)
        if improvement < spec.min_absolute_improvement and spec.min_absolute_improvement == 0.0:
            reasons.append(f"{primary} is worse than the baseline's ({_fmt(value)} vs {_fmt(base)})")
        elif improvement < spec.min_absolute_improvement:
            reasons.append(
                f"{primary} improves on the baseline by {_fmt(improvement)} "
                f"({_fmt(value)} vs {_fmt(base)}), needs at least {_fmt(spec.min_absolute_improvement)}"
            )
        relative = improvement / abs(base) if base != 0 else (math.inf if improvement > 0 else 0.0)
        if spec.min_relative_improvement != 0.0 and relative < spec.min_relative_improvement:
            reasons.append(
                f"{primary} relative improvement {relative:.2%} is below the required "
                f"{spec.min_relative_improvement:.2%}"
            )
    for name, bound in sorted(spec.upper_bounds.items()):
        v = candidate.get(name, math.nan)
        if math.isnan(v) or v > bound:
            reasons.append(f"{name} {_fmt(v)} exceeds its upper bound {_fmt(bound)}")
    for name, bound in sorted(spec.lower_bounds.items()):
        v = candidate.get(name, math.nan)
        if math.isnan(v) or v < bound:
            reasons.append(f"{name} {_fmt(v)} is below its lower bound {_fmt(bound)}")
    return GateOutcome(passed=not reasons, reasons=reasons)
