"""Durable state behind one contract (``Store``); ``SqliteStore`` is the embedded default.

Nothing here speaks gRPC or protobuf: values are plain dataclasses and opaque
bytes, refusals are ``StoreError`` subclasses that ``service/errors.py`` maps
to statuses. Every backend passes ``tests/store/contract``.
"""

from evalstream.service.store.base import (
    FINALIZED,
    OPEN,
    TOO_LARGE,
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    ShardOpenRequest,
    ShardRow,
    Store,
    StoredChunk,
    StorePolicy,
)
from evalstream.service.store.errors import (
    NotFound,
    NotWritable,
    SchemaTooNew,
    SequenceConflict,
    ShardMismatch,
    StoreError,
    StoreFull,
    StoreReadOnly,
)
from evalstream.service.store.sqlite import SqliteStore

__all__ = [
    "FINALIZED",
    "OPEN",
    "TOO_LARGE",
    "ChunkCommit",
    "EvaluationKey",
    "EvaluationRow",
    "NotFound",
    "NotWritable",
    "Rejection",
    "SchemaTooNew",
    "SequenceConflict",
    "ShardMismatch",
    "ShardOpenRequest",
    "ShardRow",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreFull",
    "StorePolicy",
    "StoreReadOnly",
    "StoredChunk",
]
