"""Where our (lo, hi] bins and TorchMetrics' [lo, hi) + extra-bin differ: confidences of exactly 1.0.

At a margin of ~30 nats the top softmax probability rounds to exactly 1.0 in
float32. We put those samples in the last bin (Guo et al., verified_calibration);
TorchMetrics puts them in a hidden (n_bins+1)-th bin of their own. When the
last bin also holds confidences below 1.0 with a different accuracy, the two
ECEs differ by the mixing of those groups; the arithmetic is shown below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from evalstream.service.engine import EngineConfig
from evalstream.service.engine.calibration import equal_width_bins
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer

C = 3000
BINS = 15


def _data() -> tuple[np.ndarray, np.ndarray]:
    """200 samples: 100 at confidence exactly 1.0 (half right) and 100 at ~0.95 (all right)."""
    rng = np.random.default_rng(5)
    n = 200
    z = rng.normal(0, 0.01, size=(n, C)).astype(np.float32)
    labels = rng.integers(0, C, size=n)
    top = np.where(np.arange(n) < 100, 40.0, np.log(0.95 / 0.05 * (C - 1)))
    winner = labels.copy()
    wrong = (np.arange(n) < 100) & (np.arange(n) % 2 == 1)
    winner[wrong] = (labels[wrong] + 1) % C
    z[np.arange(n), winner] = top
    return z, labels


def test_confidence_of_one_is_in_our_last_bin_and_torchmetrics_extra_bin() -> None:
    z, labels = _data()
    cfg = EngineConfig(device="cpu", num_bins=BINS)
    recs = ChunkReducer(C, cfg).reduce(z, labels)
    assert (recs.confidence[:100] == 1.0).all()  # rounds to exactly 1.0 in float32
    assert ((recs.confidence[100:] > 14 / 15) & (recs.confidence[100:] < 1.0)).all()
    assert (equal_width_bins(recs.confidence.astype(np.float64), BINS) == BINS - 1).all()
    ours = compute_metrics(recs, C, cfg).calibration

    conf = recs.confidence.astype(np.float64)
    correct = recs.rank == 0
    # Ours: one bin, mean confidence vs accuracy 150/200.
    expected_ours = abs(conf.mean() - correct.mean())
    # TorchMetrics: two groups, each weighted by its share.
    hi, lo = slice(0, 100), slice(100, 200)
    expected_tm = 0.5 * abs(conf[hi].mean() - correct[hi].mean()) + 0.5 * abs(
        conf[lo].mean() - correct[lo].mean()
    )
    tm = MulticlassCalibrationError(num_classes=C, n_bins=BINS, norm="l1")(
        torch.from_numpy(z), torch.from_numpy(labels)
    ).item()
    tm_max = MulticlassCalibrationError(num_classes=C, n_bins=BINS, norm="max")(
        torch.from_numpy(z), torch.from_numpy(labels)
    ).item()
    assert ours.ece == pytest.approx(expected_ours, rel=1e-9)
    assert tm == pytest.approx(expected_tm, rel=1e-5)
    assert ours.mce == pytest.approx(expected_ours, rel=1e-9)
    assert tm_max == pytest.approx(abs(conf[hi].mean() - correct[hi].mean()), rel=1e-5)
    # Over-confident (1.0 at 50%) and under-confident (0.95 at 100%) groups partly cancel in ours:
    # |0.975 - 0.75| = 0.225 against 0.5 * 0.5 + 0.5 * 0.05 = 0.275 in TorchMetrics.
    assert tm - ours.ece == pytest.approx(0.05, abs=1e-4)
    assert ours.bins[-1].count == 200
