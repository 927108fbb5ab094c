"""`evalstream show` warns when many labels tied another class's score (collapsed or saturated
scores), and stays quiet on healthy data."""

from __future__ import annotations

import numpy as np
import torch

from evalstream.client.render import render_evaluation
from evalstream.service.convert import result_from_report
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.v1 import evaluation_pb2

CFG = EngineConfig(device="cpu")


def _shown(scores: torch.Tensor, labels: torch.Tensor) -> str:
    c = scores.shape[1]
    report = compute_metrics(ChunkReducer(c, CFG).reduce(scores, labels), c, CFG)
    ev = evaluation_pb2.Evaluation(
        state=evaluation_pb2.EVALUATION_STATE_FINALIZED, num_classes=c, result=result_from_report(report)
    )
    return render_evaluation(ev)


def test_show_warns_on_a_collapsed_model_and_not_on_a_healthy_one() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 100, (500,), generator=gen)
    collapsed = _shown(torch.zeros(500, 100), labels)
    assert "WARNING: 100.0% of samples had their label's score exactly tied" in collapsed
    healthy = _shown(torch.randn(500, 100, generator=gen), labels)
    assert "WARNING" not in healthy
    assert np.isclose(float(collapsed.count("WARNING")), 1.0)
