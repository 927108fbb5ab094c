"""Service errors and their gRPC status: one place decides which code every failure gets.

Ingest and the store raise ``ServiceError`` with a status *name* so they stay
free of gRPC types; the servicer turns it into a status with ``status_of``.
Messages say what was wrong and what to do, because the caller reads them.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the service refuses; ``code`` is a ``grpc.StatusCode`` name."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    """The request itself is malformed (bad name, rank out of range, unknown metric)."""

    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """The evaluation named does not exist."""

    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    """The request disagrees with stored state (world size, class count, finalized, sequence gap)."""

    code = "FAILED_PRECONDITION"


class Aborted(ServiceError):
    """A concurrency conflict the client may retry (the rank is held by another stream)."""

    code = "ABORTED"


class ResourceExhausted(ServiceError):
    """A configured limit is reached (open shards, samples per evaluation)."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """The server is shutting down; the client should resume elsewhere or later."""

    code = "UNAVAILABLE"


def status_code(name: str) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a code name; unknown names are INTERNAL."""
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed RPC ends with."""
    if isinstance(exc, ServiceError):
        return status_code(exc.code), exc.message
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in grpc.StatusCode.__members__:
        # CompareError(code, message) from service/compare.
        return status_code(code), str(getattr(exc, "message", exc))
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
