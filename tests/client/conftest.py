"""A client connected to the shared loopback server (tests/conftest.py) and the data to stream to it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from evalstream.client import EvalClient, RetryPolicy
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.records import Records
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from tests.support.servers import small_settings

__all__ = ["FAST_RETRY", "NUM_CLASSES", "engine_metrics", "make_batches", "small_settings"]

NUM_CLASSES = 50
# Reconnect fast in tests; a dropped connection should be back within a second.
FAST_RETRY = RetryPolicy(max_attempts=20, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[EvalClient]:
    with EvalClient(server.target, retry=FAST_RETRY) as c:
        yield c


def make_batches(
    n_batches: int, rows: int, num_classes: int = NUM_CLASSES, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Random logits (a learnable signal on the label), labels and global sample ids."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        labels = rng.integers(0, num_classes, size=rows)
        logits = rng.standard_normal((rows, num_classes)).astype(np.float32)
        logits[np.arange(rows), labels] += 2.0
        out.append((logits, labels.astype(np.int64), np.arange(b * rows, (b + 1) * rows, dtype=np.int64)))
    return out


def engine_metrics(
    settings: Settings, scores: object, labels: object, num_classes: int = NUM_CLASSES
) -> dict:
    """What the server should report: the engine run in-process on the same data."""
    config = settings.engine_config()
    records = ChunkReducer(num_classes, config).reduce(scores, labels)
    return compute_metrics(Records.concat([records]), num_classes, config).scalars()
