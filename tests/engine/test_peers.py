"""Agreement with the named peers: scikit-learn top-k and TorchMetrics accuracy and calibration."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from tests.engine.data import TEST_CONFIG, make_data


@pytest.mark.parametrize(("num_classes", "n", "seed"), [(10, 2000, 21), (100, 2000, 22), (3000, 1000, 23)])
def test_accuracy_and_calibration_match_peers(num_classes: int, n: int, seed: int) -> None:
    data = make_data(num_classes, n, seed)  # tie-free: peers break ties their own way
    rep = compute_metrics(
        ChunkReducer(num_classes, TEST_CONFIG).reduce(data.logits, data.labels), num_classes, TEST_CONFIG
    )
    logits, labels = torch.from_numpy(data.logits), torch.from_numpy(data.labels)
    classes = np.arange(num_classes)
    for k in (1, 5):
        sk = top_k_accuracy_score(data.labels, data.logits, k=k, labels=classes)
        tm = MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")(logits, labels).item()
        assert rep.top_k[k] == pytest.approx(sk, rel=1e-12)
        assert rep.top_k[k] == pytest.approx(tm, rel=1e-6)
    conf = torch.softmax(logits, 1).max(1).values
    on_edge = torch.isin(conf, torch.linspace(0, 1, TEST_CONFIG.num_bins + 1))
    assert not on_edge.any(), "the peer comparison needs no confidence on a bin edge"
    norms: tuple[tuple[Literal["l1", "l2", "max"], float], ...] = (
        ("l1", rep.calibration.ece),
        ("l2", rep.calibration.rms_ce),
        ("max", rep.calibration.mce),
    )
    for norm, got in norms:
        metric = MulticlassCalibrationError(num_classes=num_classes, n_bins=TEST_CONFIG.num_bins, norm=norm)
        assert got == pytest.approx(metric(logits, labels).item(), rel=1e-6), norm
