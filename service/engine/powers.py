"""Powers of one exponential instead of one exponential per temperature.

The temperature model (curve.py) needs, per row and grid point b, the residual sum
sum_c exp(b x_c) over the classes outside the top 4 (x_c = d_c - d_(5) <= 0). When every grid
point is a multiple k s of one step s (the default grid: s = 1/40), that is r ** k with
r = exp(s x), formed by repeated squaring and products (multiplications only, inside the one loop
over classes): ``RestPlan``. Any other point takes exp(b x) directly.

The compiled pass's ``Ladder`` does the same for the normaliser: with q = exp(step * d), e = q **
(1 / step) gives S = sum_c e_c and e ** 2 the Brier sum. Unnormalised powers have their largest
term exactly 1, so sums are >= 1 and small powers underflow only where exp(a * d) does.

This module only plans which powers a grid needs; fused.py executes it (for both backends).
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


# The residual sums of the temperature model (curve.py) take every grid point as a power of one
# exponential when the grid is made of multiples of one of these steps (the default grid's is 1/40).
REST_STEPS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.1, 0.05, 0.025, 0.0125)
# Their ladder rounds about k/2 float32 ulps into q ** k: 400 ulps (2.4e-5 relative) at k = 800,
# the default grid's b = 20, where the residual is a small share of the sum. Beyond: exp directly.
MAX_REST_EXPONENT = 1024


@dataclass(frozen=True)
class RestPlan:
    """How the engine gets sum_c exp(b (d_c - d_5)) over the classes outside the top 4 at each b.

    ``step``: the exponential's step s (r = exp(s x)); every grid point with ``exponents[j]`` not
    None is r ** k with k = b / s, by squarings and products; the others take exp(b x) directly.
    """

    step: float
    exponents: tuple[int | None, ...]

    def needed(self) -> tuple[int, ...]:
        return tuple(sorted({k for k in self.exponents if k is not None}))


def rest_plan(inverse_temperatures: tuple[float, ...]) -> RestPlan:
    """The coarsest step of which every grid point is a multiple (to 1e-9), else the direct path."""
    for step in REST_STEPS:
        ks = [a / step for a in inverse_temperatures]
        if all(abs(k - round(k)) <= 1e-9 * k and 1 <= round(k) <= MAX_REST_EXPONENT for k in ks):
            return RestPlan(step, tuple(round(k) for k in ks))
    return RestPlan(1.0, tuple(None for _ in inverse_temperatures))
