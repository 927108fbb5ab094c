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

if __name__ != "evalstream.client":  # pragma: no cover - only a wrong sys.path gets here
    raise ImportError(
        f"this folder is the package evalstream.client; import it by that name, not as {__name__!r} "
        "(install the project with `pip install -e .`, or run `make test`)"
    )


from evalstream.client.client import DEFAULT_TARGET, EvalClient
from evalstream.client.errors import ChunkRejectedError, EvalStreamError, EvaluationTimeout
from evalstream.client.stream import EvaluationStream, StreamStats
from evalstream.client.transport import RetryPolicy, TLSConfig

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
