"""The temperature model's columns of each row: log_rest, rest_slope and rest_curvature (curve.py).

With m = max z, a the first index of m and m2 the largest other score, per grid point b:

    L(b) = log sum_{c != a} exp(b (z_c - m)) = b (m2 - m) + log S0
    b L'(b) = b (m2 - m) + b S1 / S0,   b^2 L''(b) = b^2 (S2 / S0 - (S1 / S0)^2)

from the sums S_j = sum_{c != a} x_c^j exp(b x_c), x_c = z_c - m2 <= 0: shifted by the rest's own
maximum, so every sum has a term exactly 1 and nothing underflows that matters. On the CPU the
sums come from one hand-written loop (rest_moments.c, built by native.py), elsewhere and as its
reference from PyTorch (``torch_sums``); both feed the same ``columns``.

Powers: where every grid point is a multiple k s of one step s (the default grid: s = 0.05,
k = 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 400), the kernel takes one exponential exp(s x) and forms
each power as the product of two earlier ones (``plan``); other points take exp(b x) directly.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

from evalstream.service.engine import native
from evalstream.service.engine.records import ABSENT, HALF_MAX

log = logging.getLogger(__name__)

# Steps tried for a grid of multiples (the coarsest that fits wins); powers beyond MAX_MULTIPLE take
# exp(b x) directly (a product chain to k rounds about k/2 float32 ulps into the power).
STEPS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.2, 0.1, 0.05, 0.025)
MAX_MULTIPLE = 512
# x is clamped here so that x^2 stays finite in float32 (its power is 0 long before).
X_FLOOR = -1e15
# The native kernel's self-check against torch_sums (relative, on the sums).
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Plan:
    """ops[i] = (a, b, scale): exp(scale x) when a < 0, else ops[a] * ops[b]; outs[j]: the op of grid
    point j; one_out: the grid index of b = 1 and two_op: the op of b = 2 (the row pass's normaliser
    and Brier sum), -1 where there is none."""

    ops: tuple[tuple[int, int, float], ...]
    outs: tuple[int, ...]
    one_out: int = -1
    two_op: int = -1


def plan(grid: tuple[float, ...]) -> Plan:
    """Each grid point (and b = 2) as a product of two earlier powers of exp(s x) where the grid is made
    of multiples of a step s, else as its own exponential."""
    one = grid.index(1.0) if 1.0 in grid else -1
    for step in STEPS:
        ks = [b / step for b in grid]
        if all(abs(k - round(k)) <= 1e-9 * k and 1 <= round(k) <= MAX_MULTIPLE for k in ks):
            ops, have = _chain([round(k) for k in ks] + [round(2.0 / step)], step)
            return Plan(ops, tuple(have[round(k)] for k in ks), one, have[round(2.0 / step)])
    exps = tuple((-1, -1, b) for b in grid)
    return Plan((*exps, (-1, -1, 2.0)), tuple(range(len(grid))), one, len(grid))


def _chain(ks: list[int], step: float) -> tuple[tuple[tuple[int, int, float], ...], dict[int, int]]:
    ops: list[tuple[int, int, float]] = [(-1, -1, step)]
    have = {1: 0}
    for k in sorted(set(ks)):
        if k in have:
            continue
        pair = next(((a, k - a) for a in sorted(have) if k - a in have), None)
        if pair is None:  # two products through an intermediate power, else an exponential of its own
            triple = next(
                (
                    (a, b)
                    for a in sorted(have)
                    for b in sorted(have)
                    if k - a - b in have and a + b not in have
                ),
                None,
            )
            if triple is not None:
                a, b = triple
                ops.append((have[a], have[b], 0.0))
                have[a + b] = len(ops) - 1
                pair = (a + b, k - a - b)
        if pair is None:
            ops.append((-1, -1, k * step))
        else:
            ops.append((have[pair[0]], have[pair[1]], 0.0))
        have[k] = len(ops) - 1
    return tuple(ops), have


def torch_sums(z: torch.Tensor, grid: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sums [n, G, 3], m [n], m2 [n]) of float32 scores on any device (the reference of the kernel)."""
    n, c = z.shape
    m, first = torch.max(z, dim=1)  # the first index of the maximum, as the kernel and ``pred``
    sums = torch.zeros((n, len(grid), 3), dtype=torch.float32, device=z.device)
    if c < 2:
        return sums, m, torch.full_like(m, -torch.inf)
    rest = z.scatter(1, first.unsqueeze(1), -torch.inf)
    m2 = rest.amax(dim=1)
    keep = torch.ones_like(z, dtype=torch.bool).scatter_(1, first.unsqueeze(1), False)
    x = torch.where(keep, rest - m2.unsqueeze(1), 0.0).clamp_(min=X_FLOOR)
    xx = x * x
    for j, b in enumerate(grid):
        e = torch.where(keep, torch.exp(x * b), 0.0)
        sums[:, j, 0] = e.sum(dim=1)
        sums[:, j, 1] = (x * e).sum(dim=1)
        sums[:, j, 2] = (xx * e).sum(dim=1)
    return sums, m, m2


def columns(
    sums: torch.Tensor, m: torch.Tensor, m2: torch.Tensor, grid: tuple[float, ...], num_classes: int
) -> torch.Tensor:
    """[n, 3G] float32: log_rest, rest_slope, rest_curvature (the last two clipped to float16's range)."""
    n, g = sums.shape[0], len(grid)
    if num_classes < 2:
        out = torch.zeros((n, 3 * g), dtype=torch.float32, device=sums.device)
        out[:, :g] = float(ABSENT)
        return out
    b = torch.tensor(grid, dtype=torch.float32, device=sums.device)
    s0, s1, s2 = sums[..., 0], sums[..., 1], sums[..., 2]
    lead = (m2 - m).unsqueeze(1) * b
    mean = s1 / s0
    var = (s2 / s0 - mean * mean).clamp_(min=0.0)
    log_rest = lead + torch.log(s0)
    slope = (lead + b * mean).clamp_(-HALF_MAX, HALF_MAX)
    curvature = (b * b * var).clamp_(max=HALF_MAX)
    return torch.cat([log_rest, slope, curvature], dim=1)


class RestMoments:
    """The model's columns for one grid: the native kernel on CPU float32 blocks once it has built
    and agreed with ``torch_sums`` on a probe, else PyTorch (``native=False`` forces PyTorch)."""

    _checked: ClassVar[dict[Plan, bool]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, grid: tuple[float, ...], num_classes: int, native_kernel: bool = True) -> None:
        self.grid = tuple(float(b) for b in grid)
        self.num_classes = num_classes
        self.plan = plan(self.grid)
        self.lib = native.library(self.plan) if native_kernel else None
        if self.lib is not None and not self._self_check():
            self.lib = None

    @property
    def is_native(self) -> bool:
        return self.lib is not None

    @property
    def has_rows(self) -> bool:
        """Whether the native kernel also does the whole row pass (the grid holds b = 1)."""
        return self.lib is not None and self.plan.one_out >= 0

    def rows(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole row pass of a CPU block on the native kernel (``has_rows``): (floats [n, 4 + 3G]:
        nll, confidence, brier, entropy and the model's columns; ints [n, 3]: pred, rank, ties; lse [n])."""
        assert self.lib is not None
        z = z.contiguous() if native.reads(self.lib, z.dtype) else z.float().contiguous()
        out = native.run(self.lib, z, labels.to(torch.int64).contiguous())
        assert out.stats is not None and out.ints is not None and out.lse is not None
        model = columns(out.sums, out.row_max, out.rest_max, self.grid, self.num_classes)
        return torch.cat([out.stats, model], dim=1), out.ints, out.lse

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """[n, 3G] columns of scores [n, C] (computed in float32 from any float dtype)."""
        if self.lib is not None and z.device.type == "cpu":
            z = z.contiguous() if native.reads(self.lib, z.dtype) else z.float().contiguous()
            out = native.run(self.lib, z)
            sums, m, m2 = out.sums, out.row_max, out.rest_max
        else:
            sums, m, m2 = torch_sums(z.float(), self.grid)
        return columns(sums, m, m2, self.grid, self.num_classes)

    def _self_check(self) -> bool:
        with self._lock:
            if self.plan not in self._checked:
                self._checked[self.plan] = self._agrees()
            return self._checked[self.plan]

    def _agrees(self) -> bool:
        assert self.lib is not None
        gen = torch.Generator().manual_seed(0)
        for c in (1, 2, 37, 1000):
            probe = torch.randn(32, c, generator=gen) * 4.0
            probe[0] = 0.0  # a constant row: ties at the maximum
            got = native.run(self.lib, probe)
            want, wm, wm2 = torch_sums(probe, self.grid)
            # Half-width scores are widened in the loop: exactly their float32 upcast's sums.
            halves = [probe.to(d) for d in (torch.bfloat16, torch.float16) if native.reads(self.lib, d)]
            ok = (
                torch.equal(got.row_max, wm)
                and torch.equal(got.rest_max, wm2)
                and torch.equal(got.first.long(), probe.argmax(dim=1))
                and torch.allclose(got.sums, want, rtol=PROBE_TOLERANCE, atol=1e-6)
                and all(
                    torch.equal(native.run(self.lib, h).sums, native.run(self.lib, h.float()).sums)
                    for h in halves
                )
            )
            if not ok:
                log.error("the native temperature kernel disagrees with PyTorch at C=%d; using PyTorch", c)
                return False
        return True
