"""The evalstream client: stream validation scores from training jobs, read and compare results.

Quick start::

    from evalstream.client import EvalClient

    with EvalClient("localhost:50051") as client:
        with client.evaluation(run="r1", model="m", step=100, rank=rank, world_size=world,
                               num_classes=3000) as ev:
            for logits, labels, ids in loader:
                ev.add(logits, labels, sample_ids=ids)
        if rank == 0:
            print(ev.result(timeout=120).result.metrics["nll"])
"""

from .client import DEFAULT_TARGET, EvalClient
from .errors import ChunkRejectedError, EvalStreamError, EvaluationTimeout
from .stream import EvaluationStream, StreamStats
from .transport import RetryPolicy, TLSConfig

__all__ = [
    "DEFAULT_TARGET",
    "ChunkRejectedError",
    "EvalClient",
    "EvalStreamError",
    "EvaluationStream",
    "EvaluationTimeout",
    "RetryPolicy",
    "StreamStats",
    "TLSConfig",
]
