"""The reducer's per-row arithmetic as one TorchInductor kernel: two loops over each row's classes.

Why: in eager PyTorch every operation is a pass over a [rows, C] block, and the
default grid needs ~30 of them a block. ``torch.compile`` fuses ``row_pass``
below into one loop for the row maximum and one loop for everything else
(exponential, powers, compare counts and the row sums), the second reading
the row from L1: at C = 3,000 that is ~4x the eager throughput on one thread. The temperature
model's columns come after it from moments.py.

Per row (z upcast to float32 inside the kernel, so half inputs are read at half width):

    m = max z,  d = z - m,  q = exp(step * d),  e = q ** unit = exp(d)
    S = sum e,  rank = #{z > z_y},  ties = #{z == z_y} - 1,  pred = first = min{c : d_c = 0}
    nll = (m - z_y) + log S,  confidence = 1 / S,  brier = sum e^2 / S^2 - 2 e_y / S + 1
    entropy = log S - sum e d / S

Sums are of unnormalised powers whose largest term is exactly 1, so nothing is
lost to underflow that matters (see docs/metrics.md). The kernel's shapes are
static except the row count (dynamic, at least 2: a one-row chunk is padded),
so each (class count, grid, score dtype, device, thread count) compiles once per
process; inductor's on-disk cache makes later processes start in seconds.
Compiled kernels live in a process-wide table; each gets its own code object so
its dynamo cache never approaches the recompile limit shared by one function.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evalstream.service.engine.powers import Ladder, ladder

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
RowPass = Callable[[torch.Tensor, torch.Tensor], Outputs]

# Probe rows for the self-check after compiling (compiled must equal the same math run eagerly).
PROBE_ROWS = 64
PROBE_TOLERANCE = 1e-5


def make_row_pass(num_classes: int, inverse_temperatures: tuple[float, ...], max_rank: int) -> RowPass:
    """The fused pass as a plain PyTorch function (runs eagerly too, ~20x slower than compiled).

    Returns ``(floats [n, 4] float32: nll, confidence, brier, entropy, ints [n, 3] int32: pred
    (argmax), rank capped at max_rank, ties, lse [n]: logsumexp of each row)``. The temperature
    model's columns are not in it: their sums come from moments.py (a loop of their own, since
    inductor recomputes their shared powers inside each reduction). ``inverse_temperatures`` stays
    in the signature and the kernel key: compiled kernels are per evaluation setting.
    """
    lad = ladder(())
    return _fresh(_row_pass_factory(num_classes, max_rank, lad))


def _row_pass_factory(num_classes: int, max_rank: int, lad: Ladder) -> RowPass:
    needed = lad.needed()
    unit = lad.unit

    def row_pass(scores: torch.Tensor, labels: torch.Tensor) -> Outputs:
        z = scores.float()
        y = labels.unsqueeze(1)
        zy = z.gather(1, y)
        m = z.amax(dim=1, keepdim=True)
        d = z - m
        # Counts and indices as float sums/minima: exact below 2**24 and vectorised like the rest.
        rank = (z > zy).float().sum(dim=1)
        ties = (z == zy).float().sum(dim=1) - 1.0
        index = torch.arange(num_classes, dtype=torch.float32, device=z.device)
        first = torch.where(d == 0.0, index, float(num_classes)).amin(dim=1)
        q = torch.exp(d * lad.step) if lad.step != 1.0 else torch.exp(d)
        powers = _powers(q, needed)
        sums = {k: powers[k].sum(dim=1) for k in needed}
        e = powers[unit]
        s = sums[unit]
        log_s = torch.log(s)
        margin = (m - zy).squeeze(1)
        nll = margin + log_s
        p_y = torch.exp(zy - m).squeeze(1) / s
        brier = sums[2 * unit] / (s * s) - 2.0 * p_y + 1.0
        entropy = log_s - (e * d).sum(dim=1) / s
        cols = torch.stack([nll, torch.reciprocal(s), brier, entropy], dim=1)
        ints = torch.stack([first, rank.clamp(max=float(max_rank)), ties], dim=1).int()
        return cols, ints, m.squeeze(1) + log_s

    return row_pass


def _powers(q: torch.Tensor, needed: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """q ** k for every k in ``needed``: squarings q, q^2, q^4, ... and one product per set bit."""
    squares = [q]
    while 1 << len(squares) <= max(needed):
        squares.append(squares[-1] * squares[-1])
    out: dict[int, torch.Tensor] = {}
    for k in needed:
        acc: torch.Tensor | None = None
        for bit, sq in enumerate(squares):
            if k >> bit & 1:
                acc = sq if acc is None else acc * sq
        assert acc is not None
        out[k] = acc
    return out


def _fresh(fn: RowPass) -> RowPass:
    """A copy of ``fn`` with its own code object: dynamo keeps its cache (and recompile count) per code
    object, and every row pass is a closure of the same code."""
    assert isinstance(fn, types.FunctionType)
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


# -- compiled kernels, one per key, process-wide ----------------------------------------------


@dataclass(frozen=True)
class KernelKey:
    num_classes: int
    inverse_temperatures: tuple[float, ...]
    max_rank: int
    dtype: torch.dtype
    device: str
    threads: int


_lock = threading.Lock()
_kernels: dict[KernelKey, RowPass | None] = {}


def compiler_available() -> bool:
    """Inductor's CPU code generation needs a C++ compiler on PATH (CXX or c++/g++/clang++)."""
    cxx = os.environ.get("CXX")
    return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["c++", "g++", "clang++"])


def kernel_for(key: KernelKey) -> RowPass | None:
    """The compiled row pass for ``key``, compiling and self-checking it on first use.

    None (logged once per key) where compiling fails or the compiled kernel disagrees
    with the same function run eagerly; the caller then runs its eager path.
    """
    if key in _kernels:  # compiled (or failed) before: no lock on the hot path
        return _kernels[key]
    with _lock:
        if key not in _kernels:
            _kernels[key] = _compile(key)
        return _kernels[key]


def _compile(key: KernelKey) -> RowPass | None:
    row_pass = make_row_pass(key.num_classes, key.inverse_temperatures, key.max_rank)
    device = torch.device(key.device)
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(PROBE_ROWS, key.num_classes, generator=gen) * 3.0).to(key.dtype).to(device)
    labels = torch.randint(0, key.num_classes, (PROBE_ROWS,), generator=gen).to(device)
    t0 = time.perf_counter()
    try:
        from torch import _dynamo as dynamo  # imported here: eager-only users never load it

        compiled: RowPass = torch.compile(row_pass, fullgraph=True)  # type: ignore[assignment]
        dynamo.mark_dynamic(probe, 0)
        dynamo.mark_dynamic(labels, 0)
        with torch.no_grad():
            got = compiled(probe, labels)
            want = row_pass(probe, labels)
    except Exception:
        log.warning("compiling the fused pass failed for %s; using the eager pass", key, exc_info=True)
        return None
    if not (
        torch.equal(got[1], want[1])
        and torch.allclose(got[0], want[0], rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE)
        and torch.allclose(got[2], want[2], rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE)
    ):
        log.error("the compiled fused pass disagrees with its eager run for %s; using the eager pass", key)
        return None
    log.info("compiled the fused pass for %s in %.1f s", key, time.perf_counter() - t0)
    return compiled
