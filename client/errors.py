"""Exceptions the client raises, so callers can catch evalstream failures as one family."""

from __future__ import annotations

import grpc

from evalstream.v1 import service_pb2


class EvalStreamError(Exception):
    """A failure talking to the evalstream service.

    ``code`` is the gRPC status when the server (or the transport) answered
    with one; the original ``grpc.RpcError`` is the ``__cause__``.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ChunkRejectedError(EvalStreamError):
    """The server refused one or more chunks in-band.

    The refused chunks changed nothing on the server (their sequence numbers
    are consumed); the stream itself goes on. ``rejections`` are the refusals
    reported by this raise; ``summary`` is set when the raise comes from
    ``close()``, which still closed the shard.

    When the rejections are why ``close()`` itself failed (every chunk was
    refused, so the evaluation has nothing to finalize), the raise leads with
    the first rejection, says how many of the sent chunks were refused and
    ends with the server's own answer; ``code`` is then that answer's status
    and ``summary`` is None. The first refusal is what the user must fix, the
    server's "nothing to finalize" only its consequence.
    """

    def __init__(
        self,
        rejections: list[service_pb2.ChunkRejection],
        summary: service_pb2.ShardSummary | None = None,
        *,
        chunks_sent: int | None = None,
        failure: EvalStreamError | None = None,
    ) -> None:
        first = rejections[0]
        lead = f"chunk {first.sequence} rejected: {first.code} {first.reason}: {first.message}"
        if chunks_sent is not None:
            count = f" ({len(rejections)} of {chunks_sent} chunks rejected)"
        else:
            count = f" (and {len(rejections) - 1} more)" if len(rejections) > 1 else ""
        then = f"; so the close failed: {failure}" if failure is not None else ""
        super().__init__(f"{lead}{count}{then}", failure.code if failure is not None else None)
        self.rejections = rejections
        self.summary = summary
        self.failure = failure


class EvaluationTimeout(EvalStreamError, TimeoutError):
    """An evaluation did not finalize (or a shard did not close) within the timeout."""
