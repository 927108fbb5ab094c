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
    """

    def __init__(
        self,
        rejections: list[service_pb2.ChunkRejection],
        summary: service_pb2.ShardSummary | None = None,
    ) -> None:
        first = rejections[0]
        more = f" (and {len(rejections) - 1} more)" if len(rejections) > 1 else ""
        super().__init__(
            f"chunk {first.sequence} rejected: {first.code} {first.reason}: {first.message}{more}"
        )
        self.rejections = rejections
        self.summary = summary


class EvaluationTimeout(EvalStreamError, TimeoutError):
    """An evaluation did not finalize (or a shard did not close) within the timeout."""
