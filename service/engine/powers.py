"""Powers of one exponential instead of one exponential each.

The compiled pass's ``Ladder``: with q = exp(step * d), e = q ** (1 / step) gives S = sum_c e_c and
e ** 2 the Brier sum. Unnormalised powers have their largest
term exactly 1, so sums are >= 1 and small powers underflow only where exp(a * d) does.

This module only plans which powers are needed; fused.py executes it. (The temperature model's
powers are planned in moments.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

# The ladder forms q ** k by squarings and products: its rounding grows about linearly in k
# (~k/2 ulps), so points beyond this exponent take exp(a * d) directly.
MAX_EXPONENT = 64


@dataclass(frozen=True)
class Ladder:
    """Powers for the compiled pass: e ** a = q ** k with q = exp(step * d).

    ``step``: 1, 0.5 or 0.25, the coarsest that makes every dyadic grid point a multiple.
    ``exponents``: k per grid point, or None where the point takes exp(a * d) directly.
    ``unit``: k of e itself (1 / step); 2 * unit is e ** 2 (Brier).
    """

    step: float
    exponents: tuple[int | None, ...]

    @property
    def unit(self) -> int:
        return round(1.0 / self.step)

    def needed(self) -> tuple[int, ...]:
        """Every exponent whose row sum the pass takes: the grid's, e and e ** 2."""
        ks = {k for k in self.exponents if k is not None} | {self.unit, 2 * self.unit}
        return tuple(sorted(ks))


def ladder(inverse_temperatures: tuple[float, ...]) -> Ladder:
    """The coarsest step that reaches every grid point that is a multiple of 1/4."""
    quarters = [round(4 * a) for a in inverse_temperatures if float(4 * a).is_integer()]
    step = 1.0 if all(k % 4 == 0 for k in quarters) else 0.5 if all(k % 2 == 0 for k in quarters) else 0.25
    exponents: list[int | None] = []
    for a in inverse_temperatures:
        k = a / step
        exponents.append(round(k) if k.is_integer() and 1 <= k <= MAX_EXPONENT else None)
    return Ladder(step, tuple(exponents))
