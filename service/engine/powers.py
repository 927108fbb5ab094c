"""The temperature grid without one exponential per temperature.

With p = softmax(z), m = max z and S = sum_c exp(z_c - m), the NLL at inverse
temperature a is

    NLL_a = logsumexp(a z) - a z_y = a * NLL + log(sum_c p_c ** a),

so the grid needs only row sums of p ** a. For dyadic a those powers follow
from square roots and products of p, far cheaper than exponentials:
p ** 0.5 = sqrt(p), p ** 0.25 = sqrt(sqrt(p)), p ** 2 = p * p, and every other
a that is a sum of two of {0.25, 0.5, 1, 2} (0.75, 1.25, 1.5, 2.5, 3, 4) is a
row-wise dot product of two of them. Any other a is computed directly as
logsumexp(a z) - a z_y (exact, one exponential per class).

This module only plans which powers a grid needs; the reducer executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Powers of p the reducer can hold in a buffer. 1.0 is p itself.
BASES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Term:
    """How to get sum_c p_c ** a: a row sum of one base power, a row dot of two, or the direct path."""

    a: float
    kind: str  # "one" (exact: log sum p = 0), "sum", "dot", "direct"
    left: float = 0.0
    right: float = 0.0


@dataclass(frozen=True)
class PowerPlan:
    terms: tuple[Term, ...]
    bases: frozenset[float] = field(default_factory=frozenset)

    @property
    def needs_sqrt(self) -> bool:
        return 0.5 in self.bases or 0.25 in self.bases

    @property
    def needs_quarter(self) -> bool:
        return 0.25 in self.bases

    @property
    def needs_square(self) -> bool:
        return 2.0 in self.bases


def plan(inverse_temperatures: tuple[float, ...]) -> PowerPlan:
    """Choose the cheapest way to get each grid point's row sum of p ** a."""
    terms: list[Term] = []
    bases: set[float] = set()
    for a in inverse_temperatures:
        if a == 1.0:
            terms.append(Term(a, "one"))
        elif a in BASES:
            terms.append(Term(a, "sum", a))
            bases.add(a)
        else:
            pair = next(((x, a - x) for x in BASES if (a - x) in BASES and x <= a - x), None)
            if pair is None:
                terms.append(Term(a, "direct"))
            else:
                terms.append(Term(a, "dot", pair[0], pair[1]))
                bases.update(pair)
    bases.discard(1.0)
    return PowerPlan(tuple(terms), frozenset(bases))
