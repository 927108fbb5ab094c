"""How exact the engine's T* and calibrated NLL are, and what each way of modelling the curve would cost.

Part 1, the engine end to end: logits of four families (Gaussian, Student-t with 3 degrees of
freedom, uniform, the demo's "sharp" model) over C = 3,000 classes, scaled so that the exact T*
falls between grid points across [0.05, 20]; each is reduced by the engine (compiled backend) and
its T* and calibrated NLL compared with a float64 golden-section search over the logits.

Part 2, the designs the issue named, in float64 on the same data (the interpolation alone, no
float32 or float16 rounding), each within the 128-byte record (38 bytes of scalars):
  values         L at 19 points (76 bytes), cubic Hermite with slopes from 4-point stencils
  values+slopes  L and L' at 13 points (78 bytes: float32 + float16), cubic Hermite
  +curvature     L, L' and L'' at 11 points (88 bytes: float32 + 2 float16), quintic Hermite (the engine's)
and the sums per class and grid point each needs in the engine (its cost: every one is a
multiply-add per class and grid point in the one loop; the powers are one exponential and
products in each design).

    .venv/bin/python -m bench.temperature [--samples 500]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from bench.common import table, write_json
from evalstream.client.synthetic import SyntheticValidationSet
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.curve import hermite_weights
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer

C = 3000
T_STARS = (0.055, 0.08, 0.3, 1.3, 4.0, 12.0, 18.0)
FAMILIES = ("gaussian", "student_t3", "uniform", "demo_sharp")
GRID_19 = (
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.275,
    0.375,
    0.5,
    0.7,
    1.0,
    1.4,
    2.0,
    2.8,
    3.8,
    5.2,
    7.2,
    10.2,
    14.4,
    20.0,
)
GRID_13 = tuple(0.05 * k for k in (1, 2, 3, 5, 8, 13, 20, 33, 53, 86, 140, 240, 400))
GRID_11 = tuple(0.05 * k for k in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 400))


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def family(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "demo_sharp":
        z32, labels, _ = SyntheticValidationSet(num_samples=n, num_classes=C, seed=seed).batch("sharp", 0, n)
        return z32.astype(np.float64), labels
    y = rng.integers(0, C, n)
    z = {
        "gaussian": lambda: rng.standard_normal((n, C)),
        "student_t3": lambda: rng.standard_t(3, (n, C)),
        "uniform": lambda: rng.random((n, C)) * 4.0,
    }[name]()
    z[np.arange(n), y] += 3.0 * rng.random(n)
    return z, y


def golden(f, lo: float, hi: float, tol: float = 1e-10) -> float:  # type: ignore[no-untyped-def]
    a, c = math.log(lo), math.log(hi)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    while c - a > tol:
        x1, x2 = c - g * (c - a), a + g * (c - a)
        if f(math.exp(x1)) <= f(math.exp(x2)):
            c = x2
        else:
            a = x1
    return math.exp((a + c) / 2)


def exact(z: np.ndarray, y: np.ndarray, lo: float = 1 / 30, hi: float = 30.0) -> tuple[float, float]:
    zy = z[np.arange(len(y)), y]

    def f(b: float) -> float:
        return float(np.mean(logsumexp(b * z) - b * zy))

    b = golden(f, lo, hi)
    return 1.0 / b, f(b)


def scaled(name: str, t_star: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    z, y = family(name, n, seed)
    t0, _ = exact(z, y, 1 / 300, 300.0)
    return z * (t_star / t0), y


def design_curve(z: np.ndarray, y: np.ndarray, design: str):  # type: ignore[no-untyped-def]
    """The mean NLL at b of a design's model, from exact float64 columns at its grid points."""
    grid = np.asarray({"values": GRID_19, "values+slopes": GRID_13, "+curvature": GRID_11}[design])
    n = len(y)
    m = z.max(axis=1)
    first = z.argmax(axis=1)
    rest = z - m[:, None]
    rest[np.arange(n), first] = -np.inf
    x = np.where(np.isfinite(rest), rest, 0.0)
    cols = []
    for b in grid:
        lse = logsumexp(b * rest)
        w = np.exp(b * rest - lse[:, None])
        mean = (w * x).sum(axis=1)
        cols.append((lse, mean, (w * (x - mean[:, None]) ** 2).sum(axis=1)))
    value = np.stack([c[0] for c in cols])
    slope = np.stack([c[1] for c in cols])
    curv = np.stack([c[2] for c in cols])
    margin = m - z[np.arange(n), y]
    g = len(grid)
    if design == "values":  # slopes from the cubics through 4 neighbouring points (the old engine)
        slope = np.stack([_stencil_slope(grid, value, i) for i in range(g)])

    def mean_nll(b: float) -> float:
        i = int(np.clip(np.searchsorted(grid, b) - 1, 0, g - 2))
        h = grid[i + 1] - grid[i]
        t = (b - grid[i]) / h
        if design == "+curvature":
            w0, w1, w2, w3, w4, w5 = hermite_weights(t)
            lr = w0 * value[i] + w1 * h * slope[i] + w2 * h * h * curv[i]
            lr += w3 * h * h * curv[i + 1] + w4 * h * slope[i + 1] + w5 * value[i + 1]
        else:
            lr = (2 * t**3 - 3 * t**2 + 1) * value[i] + (t**3 - 2 * t**2 + t) * h * slope[i]
            lr += (-2 * t**3 + 3 * t**2) * value[i + 1] + (t**3 - t**2) * h * slope[i + 1]
        return float(np.mean(b * margin + np.logaddexp(0.0, lr)))

    return mean_nll


def _stencil_slope(grid: np.ndarray, value: np.ndarray, i: int) -> np.ndarray:
    """L'(b_i) of every sample: the mean derivative of the cubics through the 4-point stencils around i."""
    g = len(grid)
    stencils = [lo for lo in (i - 1, i - 2) if lo >= 0 and lo + 4 <= g] or [int(np.clip(i - 1, 0, g - 4))]
    out = np.zeros(value.shape[1])
    x = grid[i]
    for lo in stencils:
        a, b, c, _ = np.polyfit(grid[lo : lo + 4], value[lo : lo + 4], 3)
        out += 3 * a * x * x + 2 * b * x + c
    return out / len(stencils)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reducer = ChunkReducer(C, EngineConfig(device="cpu", backend="compiled"))
    rows, designs = [], {d: [0.0, 0.0] for d in ("values", "values+slopes", "+curvature")}
    for name in FAMILIES:
        for t_star in T_STARS:
            z, y = scaled(name, t_star, args.samples, seed=int(t_star * 100) + 11)
            z32 = z.astype(np.float32)
            exact_t, exact_nll = exact(z32.astype(np.float64), y)
            rep = compute_metrics(reducer.reduce(torch.from_numpy(z32), y), C, reducer.config).temperature
            rows.append(
                {
                    "family": name,
                    "T*": round(exact_t, 4),
                    "T* error": f"{rep.best_temperature / exact_t - 1:+.1e}",
                    "NLL error": f"{rep.calibrated_nll - exact_nll:+.1e}",
                }
            )
            t64, nll64 = exact(z, y)
            for design, worst in designs.items():
                f = design_curve(z, y, design)
                b = golden(f, 0.05, 20.0)
                worst[0] = max(worst[0], abs(1 / b / t64 - 1))
                worst[1] = max(worst[1], abs(f(b) - nll64))
            print(rows[-1], flush=True)
    print(table(rows, ["family", "T*", "T* error", "NLL error"]))
    worst_t = max(abs(float(str(r["T* error"]))) for r in rows)
    worst_nll = max(abs(float(str(r["NLL error"]))) for r in rows)
    print(
        f"engine: worst T* error {worst_t:.1e} (need < 1e-2), "
        f"worst calibrated NLL error {worst_nll:.1e} (need < 1e-4)"
    )
    sums = {"values": (19, 1), "values+slopes": (13, 2), "+curvature": (11, 3)}
    design_rows = [
        {
            "design": d,
            "points": sums[d][0],
            "model bytes": {"values": 76, "values+slopes": 78, "+curvature": 88}[d],
            "sums a class": sums[d][0] * sums[d][1],
            "worst T* error": f"{w[0]:.1e}",
            "worst NLL error": f"{w[1]:.1e}",
        }
        for d, w in designs.items()
    ]
    print(
        table(
            design_rows,
            ["design", "points", "model bytes", "sums a class", "worst T* error", "worst NLL error"],
        )
    )
    write_json(
        "temperature",
        {
            "samples": args.samples,
            "classes": C,
            "engine": rows,
            "designs": design_rows,
            "worst": {"t_star_relative": worst_t, "calibrated_nll": worst_nll},
        },
    )


if __name__ == "__main__":
    main()
