"""Service errors and their gRPC status: one place decides which code every failure gets.

Ingest and the store raise ``ServiceError`` with a status *name* so they stay
free of gRPC types; the servicer turns it into a status with ``status_of``.
Messages say what was wrong and what to do, because the caller reads them.
"""

from __future__ import annotations

import errno
import sqlite3

import grpc
from google.protobuf.message import DecodeError

# The store cannot take writes: out of space (the message says to free some) ...
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_SPACE_SQLITE = frozenset({"SQLITE_FULL"})
# ... or cannot be written at all (read-only file or file system, permissions, I/O errors).
_UNWRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
_UNWRITABLE_SQLITE_PREFIXES = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM")


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
    if isinstance(exc, DecodeError):
        # Raised by gRPC's deserialisation of a request (corrupt bytes, a string that is not UTF-8).
        return grpc.StatusCode.INVALID_ARGUMENT, (
            f"the request is not a valid evalstream.v1 message ({exc}); strings (names) must be UTF-8"
        )
    store = store_failure(exc)
    if store is not None:
        return store
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def store_failure(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """A write the store could not make (disk full, read-only, I/O error): a status that says so.

    Nothing of the failed write was committed (each commit is one transaction), so
    the message can promise that what was acknowledged before is kept.
    """
    kept = "chunks acknowledged before are kept"
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name in _NO_SPACE_SQLITE:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"the store is out of space ({exc}); free space under data_dir and resend; {kept}"
            )
        if name.startswith(_UNWRITABLE_SQLITE_PREFIXES):
            return grpc.StatusCode.UNAVAILABLE, (
                f"the store cannot be written ({name}: {exc}); check that data_dir is writable and resend; "
                f"{kept}"
            )
        return None
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in _NO_SPACE_ERRNOS:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"the store is out of space ({exc.strerror}); free space under data_dir and resend; {kept}"
            )
        if exc.errno in _UNWRITABLE_ERRNOS:
            return grpc.StatusCode.UNAVAILABLE, (
                f"the store cannot be written ({exc.strerror}); check that data_dir is writable and "
                f"resend; {kept}"
            )
    return None
