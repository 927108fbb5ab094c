"""What a store refuses, in the domain's words; ``service/errors.py`` maps each to a gRPC status.

A store is used by the service and by tests, and a second backend must fail the
same way the first does, so its failures are plain exceptions with structured
fields rather than status codes or user-facing remedies: the one place that
turns them into what a client reads is ``status_of``.
"""

from __future__ import annotations

import errno

# Out of space, or a file grown past what the process may write.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Cannot be written at all: read-only file or file system, permissions, I/O errors.
UNWRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class StoreError(Exception):
    """Base of every refusal a store raises on purpose."""


class NotFound(StoreError):
    """The evaluation (or its shard for a rank) does not exist."""

    def __init__(self, evaluation_id: str, rank: int | None = None) -> None:
        what = f"evaluation {evaluation_id!r}" if rank is None else f"rank {rank} of {evaluation_id!r}"
        super().__init__(f"no {what}")
        self.evaluation_id = evaluation_id
        self.rank = rank


class SequenceConflict(StoreError):
    """The chunk's sequence is not the shard's next one (a duplicate or a gap).

    A committed sequence is never written again: a chunk resent with the same
    sequence, whatever its content, gets this and changes nothing.
    """

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected sequence {expected}, got {got}")
        self.expected = expected
        self.got = got


class ShardMismatch(StoreError):
    """A rank opened an evaluation with a different world size, class count or score kind."""

    def __init__(self, name: str, field: str, stored: object, requested: object) -> None:
        super().__init__(f"{name}: {field} is {stored}, the shard says {requested}")
        self.name = name
        self.field = field
        self.stored = stored
        self.requested = requested


class NotWritable(StoreError):
    """The shard is closed or the evaluation finalized: it takes no more chunks."""

    def __init__(self, evaluation_id: str, rank: int, finalized: bool) -> None:
        state = "finalized" if finalized else f"closed for rank {rank}"
        super().__init__(f"evaluation {evaluation_id} is {state}")
        self.evaluation_id = evaluation_id
        self.rank = rank
        self.finalized = finalized


class StoreFull(StoreError):
    """A write failed for lack of space; nothing of it was committed."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class StoreReadOnly(StoreError):
    """A write failed because the store cannot be written (read-only, permissions, I/O error)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class SchemaTooNew(StoreError):
    """The database was written by a newer server whose schema this one does not know."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"the database has schema version {found}; this server knows versions up to {supported} "
            "(run a newer server, or point data_dir elsewhere)"
        )
        self.found = found
        self.supported = supported


def classify_os_error(exc: BaseException) -> StoreError | None:
    """The store refusal an ``OSError`` from writing the store's files means, if any."""
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in NO_SPACE_ERRNOS:
            return StoreFull(exc.strerror or str(exc))
        if exc.errno in UNWRITABLE_ERRNOS:
            return StoreReadOnly(exc.strerror or str(exc))
    return None
