"""Durable state behind a small interface (``Store``); ``SqliteStore`` is the embedded default."""

from .base import (
    FINALIZED,
    OPEN,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    Store,
)
from .sqlite import SqliteStore

__all__ = [
    "FINALIZED",
    "OPEN",
    "EvaluationKey",
    "EvaluationRow",
    "Rejection",
    "SequenceConflict",
    "ShardOpenRequest",
    "ShardRow",
    "SqliteStore",
    "Store",
]
