"""The rules every store backend applies the same way: what a shard's open and writes must agree with.

Kept apart from the backends so SQLite and PostgreSQL refuse the same requests with the same
errors (the contract suite in tests/store/contract checks both).
"""

from __future__ import annotations

from evalstream.service.store.base import EvaluationRow, ShardOpenRequest, ShardRow
from evalstream.service.store.errors import NotWritable, ShardMismatch


def check_agrees(ev: EvaluationRow, request: ShardOpenRequest) -> None:
    """The shard must describe the same evaluation every other rank opened."""
    for field, stored, requested in (
        ("world_size", ev.world_size, request.world_size),
        ("num_classes", ev.num_classes, request.num_classes),
        ("score_kind", ev.score_kind, request.score_kind),
    ):
        if stored != requested:
            raise ShardMismatch(ev.key.name, field, stored, requested)


def too_large(ev: EvaluationRow, total: int, max_samples: int) -> str:
    """The rejection message of a chunk that would take the evaluation over its sample limit."""
    return (
        f"evaluation {ev.key.name} would hold {total} samples, "
        f"over the server's max_samples_per_evaluation={max_samples}"
    )


def check_writable(ev: EvaluationRow, shard: ShardRow) -> None:
    """Chunks go only to an open shard of an evaluation that is not finalized."""
    if ev.finalized or shard.closed:
        raise NotWritable(ev.evaluation_id, shard.rank, finalized=ev.finalized)
