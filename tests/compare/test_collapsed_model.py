"""A collapsed model (constant scores) never outranks a model with real signal, whatever the metric."""

from __future__ import annotations

import numpy as np
import pytest

from evalstream.service.compare import CompareOptions, compare
from tests.compare.synth import candidate, world

N, C = 3000, 50
IDS = np.arange(N)


PRIMARIES = ["accuracy_top1", "accuracy_top5", "balanced_accuracy", "nll", "macro_f1"]


@pytest.mark.parametrize("primary", PRIMARIES)
def test_constant_model_ranks_below_a_weak_real_model(primary: str) -> None:
    logits, labels = world(N, C, seed=4, sharpness=0.7)
    rng = np.random.default_rng(2)
    weak = candidate("weak", 0.5 * (logits + 1.5 * rng.standard_normal(logits.shape)), labels, IDS)
    collapsed = candidate("collapsed", np.zeros_like(logits), labels, IDS)
    result = compare([collapsed, weak], CompareOptions(replicates=200, primary_metric=primary))
    assert [c.name for c in result.candidates] == ["weak", "collapsed"]
    dead = result.candidates[1]
    assert dead.metrics["accuracy_top1"] == pytest.approx(1 / C, rel=1e-12)
    assert dead.metrics["accuracy_top5"] == pytest.approx(5 / C, rel=1e-12)
    assert dead.metrics["label_tie_share"] == 1.0
