"""Fresh random evaluation data with fixed seeds: informative logits, Zipf-distributed labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evalstream.service.engine import EngineConfig

# The test grid: the default one plus a non-dyadic point that takes the direct path.
TEST_CONFIG = EngineConfig(device="cpu", block_rows=256)


@dataclass
class Data:
    logits: np.ndarray  # [n, C] float32
    labels: np.ndarray  # [n] int64
    sample_ids: np.ndarray  # [n] int64, a permutation of 0..n-1


def zipf_labels(rng: np.random.Generator, n: int, num_classes: int, s: float = 1.1) -> np.ndarray:
    """Labels with P(class of popularity rank r) ~ 1 / r**s, popularity order shuffled over classes."""
    weights = 1.0 / np.arange(1, num_classes + 1) ** s
    classes = rng.permutation(num_classes)
    return classes[rng.choice(num_classes, size=n, p=weights / weights.sum())].astype(np.int64)


def make_data(num_classes: int, n: int, seed: int, scale: float = 2.0, tie_free: bool = True) -> Data:
    """Logits ~ N(0, scale) with a random boost on the label (so accuracy is neither 0 nor 1)."""
    rng = np.random.default_rng(seed)
    labels = zipf_labels(rng, n, num_classes)
    z = rng.normal(0.0, scale, size=(n, num_classes))
    z[np.arange(n), labels] += rng.uniform(0.0, 3.0 * scale, size=n)
    logits = z.astype(np.float32)
    if tie_free:
        logits = break_ties(logits)
    return Data(logits, labels, rng.permutation(n).astype(np.int64))


def break_ties(logits: np.ndarray) -> np.ndarray:
    """Nudge rows where two logits are exactly equal until none are (peers break ties differently)."""
    out = logits.copy()
    for _ in range(10):
        s = np.sort(out, axis=1)
        rows = np.flatnonzero((np.diff(s, axis=1) == 0).any(axis=1))
        if len(rows) == 0:
            return out
        out[rows] += np.random.default_rng(len(rows)).normal(0, 1e-3, size=out[rows].shape).astype(np.float32)
    raise AssertionError("could not break ties")
