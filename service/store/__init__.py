"""Durable state behind a small interface (``Store``); ``SqliteStore`` is the embedded default."""

from evalstream.service.store.base import (
    FINALIZED,
    OPEN,
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    Store,
    StoredChunk,
)
from evalstream.service.store.sqlite import SqliteStore

__all__ = [
    "FINALIZED",
    "OPEN",
    "ChunkCommit",
    "EvaluationKey",
    "EvaluationRow",
    "Rejection",
    "SequenceConflict",
    "ShardOpenRequest",
    "ShardRow",
    "SqliteStore",
    "Store",
    "StoredChunk",
]
