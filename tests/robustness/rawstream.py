"""A well-formed batch, and the evaluation the lock-step streams (tests/support/lockstep.py) wrote."""

from __future__ import annotations

import grpc
import numpy as np

from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.support.lockstep import RUN


def good_batch(rows: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=rows).astype(np.int64)
    scores = rng.normal(size=(rows, num_classes)).astype(np.float32)
    scores[np.arange(rows), labels] += 1.5
    return scores, labels


def get_evaluation(channel: grpc.Channel, model: str, run: str = RUN) -> evaluation_pb2.Evaluation:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = evaluation_pb2.EvaluationRef(run=run, model=model, split="validation", step=0)
    request = service_pb2.GetEvaluationRequest(ref=ref, include_per_class=True)
    return stub.GetEvaluation(request, timeout=30).evaluation
