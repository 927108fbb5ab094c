"""An independent float64 numpy reference of every per-sample quantity and metric.

Written from the definitions in docs/metrics.md, not from the engine's code:
direct logsumexp, explicit one-hot Brier, -sum p log p, per-bin loops.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def per_sample(
    logits32: np.ndarray, labels: np.ndarray, inverse_temperatures: np.ndarray
) -> dict[str, np.ndarray]:
    z = logits32.astype(np.float64)
    n, _c = z.shape
    rows = np.arange(n)
    zy = z[rows, labels]
    lse = logsumexp(z)
    logp = z - lse[:, None]
    p = np.exp(logp)
    onehot = np.zeros_like(p)
    onehot[rows, labels] = 1.0
    rank = (z > zy[:, None]).sum(axis=1)
    ties = (z == zy[:, None]).sum(axis=1) - 1
    return {
        "nll": lse - zy,
        "confidence": p.max(axis=1),
        "brier": ((p - onehot) ** 2).sum(axis=1),
        "entropy": -(p * logp).sum(axis=1),
        "rank": rank,
        "ties": ties,
        "pred": z.argmax(axis=1),
        "nll_t": np.stack([logsumexp(a * z) - a * zy for a in inverse_temperatures], axis=1),
        **temperature_model(z, inverse_temperatures),
    }


ABSENT = -1e30
HALF_MAX = 65504.0


def temperature_model(z: np.ndarray, inverse_temperatures: np.ndarray) -> dict[str, np.ndarray]:
    """log_rest, rest_slope, rest_curvature in float64: L(b) = log sum over the classes other than the
    first maximum of exp(b (z_c - max z)), b L'(b) and b^2 L''(b) (the softmax mean and variance of
    z_c - max z over those classes); ABSENT, 0, 0 where there is no other class."""
    n, c = z.shape
    g = len(inverse_temperatures)
    if c < 2:
        return {
            "log_rest": np.full((n, g), ABSENT),
            "rest_slope": np.zeros((n, g)),
            "rest_curvature": np.zeros((n, g)),
        }
    d = z - z.max(axis=1, keepdims=True)
    first = z.argmax(axis=1)
    rest = d.copy()
    rest[np.arange(n), first] = -np.inf
    cols: dict[str, list[np.ndarray]] = {"log_rest": [], "rest_slope": [], "rest_curvature": []}
    for b in inverse_temperatures:
        lse = logsumexp(b * rest)
        w = np.exp(b * rest - lse[:, None])
        x = np.where(np.isfinite(rest), rest, 0.0)
        mean = (w * x).sum(axis=1)
        var = (w * (x - mean[:, None]) ** 2).sum(axis=1)
        cols["log_rest"].append(lse)
        cols["rest_slope"].append(np.clip(b * mean, -HALF_MAX, HALF_MAX))  # float16's range, as stored
        cols["rest_curvature"].append(np.minimum(b * b * var, HALF_MAX))
    return {k: np.stack(v, axis=1) for k, v in cols.items()}


def topk_credit(rank: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """Expected top-k correctness when the label and its e tied classes are ordered at random:
    of the e + 1 tied classes, k - g fit within the top k (g strictly higher), each equally likely
    to be the label. Written as the probability, one sample at a time."""
    out = np.empty(len(rank))
    for i, (g, e) in enumerate(zip(rank.tolist(), ties.tolist(), strict=True)):
        slots = k - g
        out[i] = 0.0 if slots <= 0 else min(1.0, slots / (e + 1))
    return out


def ece_guo(conf: np.ndarray, correct: np.ndarray, num_bins: int) -> tuple[float, float, float, list[int]]:
    """ECE, RMS, MCE over (lo, hi] bins, as in Guo et al.'s reference loop."""
    edges = np.linspace(0, 1, num_bins + 1)
    ece = rms = mce = 0.0
    counts = []
    for b, (lo, hi) in enumerate(itertools.pairwise(edges)):
        in_bin = (conf > lo) & (conf <= hi) if b > 0 else (conf >= lo) & (conf <= hi)
        counts.append(int(in_bin.sum()))
        if in_bin.any():
            gap = abs(conf[in_bin].mean() - correct[in_bin].mean())
            w = in_bin.mean()
            ece += w * gap
            rms += w * gap * gap
            mce = max(mce, gap)
    return ece, float(np.sqrt(rms)), mce, counts


def adaptive_ece(conf: np.ndarray, correct: np.ndarray, num_bins: int) -> float:
    pairs = sorted(zip(conf.tolist(), correct.astype(int).tolist(), strict=True))
    n = len(pairs)
    base, extra = divmod(n, num_bins)
    total, start = 0.0, 0
    for b in range(num_bins):
        size = base + (1 if b < extra else 0)
        chunk = pairs[start : start + size]
        start += size
        if chunk:
            total += abs(sum(c for c, _ in chunk) - sum(k for _, k in chunk))
    return total / n


def buckets(labels: np.ndarray, correct: np.ndarray, num_classes: int) -> list[tuple[int, int, float]]:
    """(num_classes, num_samples, accuracy) per bucket; a class goes where its first sample falls."""
    support = Counter(labels.tolist())
    ranked = sorted(support, key=lambda c: (-support[c], c))
    n = len(labels)
    assign: dict[int, int] = {}
    seen = 0
    for c in ranked:
        assign[c] = min(2, (3 * seen) // n)
        seen += support[c]
    out = []
    for b in range(3):
        members = [c for c in ranked if assign[c] == b]
        mask = np.isin(labels, members)
        out.append((len(members), int(mask.sum()), float(correct[mask].mean()) if mask.any() else 0.0))
    return out


def confusions(labels: np.ndarray, pred: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    counts = Counter((int(a), int(b)) for a, b in zip(labels, pred, strict=True) if a != b)
    return [(a, b, c) for (a, b), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def exact_temperature(
    logits: np.ndarray, labels: np.ndarray, lo: float = 1 / 60, hi: float = 60.0
) -> tuple[float, float]:
    """(T*, mean NLL at T*) by golden-section search in log b over the float64 logits themselves (the
    NLL is convex in b = 1/T), to 1e-10 in log b."""
    z = logits.astype(np.float64)
    zy = z[np.arange(len(labels)), labels]

    def f(log_b: float) -> float:
        b = np.exp(log_b)
        return float(np.mean(logsumexp(b * z) - b * zy))

    a, c = np.log(lo), np.log(hi)
    g = (np.sqrt(5.0) - 1.0) / 2.0
    while c - a > 1e-10:
        x1, x2 = c - g * (c - a), a + g * (c - a)
        if f(x1) <= f(x2):
            c = x2
        else:
            a = x1
    x = (a + c) / 2
    return float(np.exp(-x)), f(x)


def best_temperature(temps: np.ndarray, nll: np.ndarray) -> tuple[float, float]:
    """T* from numpy.polyfit through the minimum and its neighbours in log T (the end if at an end)."""
    j = int(np.argmin(nll))
    if j in (0, len(temps) - 1):
        return float(temps[j]), float(nll[j])
    x = np.log(temps[j - 1 : j + 2])
    a, b, c = np.polyfit(x, nll[j - 1 : j + 2], 2)
    xs = -b / (2 * a)
    return float(np.exp(xs)), float(np.polyval([a, b, c], xs))
