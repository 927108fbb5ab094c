"""Service errors and their gRPC status: one place decides which code every failure gets.

Ingest raises ``ServiceError`` with a status *name* so it stays free of gRPC
types; the store raises its own refusals (``service/store/errors.py``) in the
domain's words. ``status_of`` turns either into the status a client reads,
adding the remedy, because the caller reads the message.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from evalstream.service.store import errors as store_errors

# Status of an in-band chunk rejection, by its stable reason; every other reason is INVALID_ARGUMENT.
REJECTION_CODES = {"chunk_too_large": "RESOURCE_EXHAUSTED", "evaluation_too_large": "RESOURCE_EXHAUSTED"}
# What a client may count on after a failed write: each commit is one transaction.
KEPT = "chunks acknowledged before are kept"


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


def rejection_code(reason: str) -> str:
    """The status name a chunk rejected for ``reason`` is answered with (the store keeps the reason)."""
    return REJECTION_CODES.get(reason, "INVALID_ARGUMENT")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed RPC ends with."""
    if isinstance(exc, ServiceError):
        return status_code(exc.code), exc.message
    if isinstance(exc, DecodeError):
        # Raised by gRPC's deserialisation of a request (corrupt bytes, a string that is not UTF-8).
        return grpc.StatusCode.INVALID_ARGUMENT, (
            f"the request is not a valid evalstream.v1 message ({exc}); strings (names) must be UTF-8"
        )
    refusal = exc if isinstance(exc, store_errors.StoreError) else store_errors.classify_os_error(exc)
    if refusal is not None:
        return store_status(refusal)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def store_status(exc: store_errors.StoreError) -> tuple[grpc.StatusCode, str]:
    """What a store refusal means to the client, and what to do about it."""
    e = store_errors
    if isinstance(exc, e.StoreFull):
        # Nothing of the failed write was committed, so what was acknowledged before is kept.
        return grpc.StatusCode.RESOURCE_EXHAUSTED, (
            f"the store is out of space ({exc.detail}); free space under data_dir and resend; {KEPT}"
        )
    if isinstance(exc, e.StoreReadOnly):
        return grpc.StatusCode.UNAVAILABLE, (
            f"the store cannot be written ({exc.detail}); check that data_dir is writable and resend; {KEPT}"
        )
    if isinstance(exc, e.NotFound):
        if exc.rank is None:
            return grpc.StatusCode.NOT_FOUND, f"no evaluation with id {exc.evaluation_id!r}"
        return grpc.StatusCode.NOT_FOUND, (
            f"evaluation {exc.evaluation_id!r} has no shard for rank {exc.rank}; open it first"
        )
    if isinstance(exc, e.ShardMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION, _mismatch(exc)
    if isinstance(exc, e.NotWritable):
        if exc.finalized:
            return grpc.StatusCode.FAILED_PRECONDITION, (
                f"evaluation {exc.evaluation_id} is finalized; no more chunks are accepted (use a new step)"
            )
        return (
            grpc.StatusCode.FAILED_PRECONDITION,
            f"rank {exc.rank} of evaluation {exc.evaluation_id} is closed",
        )
    if isinstance(exc, e.SequenceConflict):
        return grpc.StatusCode.FAILED_PRECONDITION, (
            f"chunk {exc.got} is not the shard's next one ({exc.expected}); resend from {exc.expected}"
        )
    return grpc.StatusCode.FAILED_PRECONDITION, str(exc)


def _mismatch(exc: store_errors.ShardMismatch) -> str:
    said = f"evaluation {exc.name} was opened with"
    if exc.field == "world_size":
        return (
            f"{said} world_size={exc.stored}, this shard says {exc.requested}; "
            "every rank must send the same world size"
        )
    if exc.field == "num_classes":
        return (
            f"{said} num_classes={exc.stored}, this shard says {exc.requested}; "
            "every rank must send the same class count"
        )
    return f"{said} score kind {exc.stored}, this shard says {exc.requested}"
