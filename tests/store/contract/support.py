"""Small steps the contract tests repeat: open a rank, commit chunks, finalize an evaluation."""

from __future__ import annotations

from evalstream.service.store import (
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    Store,
    StoredChunk,
)

NUM_CLASSES = 10


def key(step: int = 0, model: str = "m", run: str = "r") -> EvaluationKey:
    return EvaluationKey(run, model, "validation", step)


def open_rank(
    store: Store, step: int = 0, rank: int = 0, world: int = 1, model: str = "m", pin: bool = False
) -> tuple[EvaluationRow, ShardRow]:
    return store.open_shard(ShardOpenRequest(key(step, model), rank, world, NUM_CLASSES, "logits", 0, pin))


def chunk(sequence: int, samples: int = 3, records: bytes | None = None) -> ChunkCommit:
    """A chunk whose records name its sequence, so a test can tell which content was kept."""
    blob = records if records is not None else f"chunk-{sequence}".encode()
    return ChunkCommit(sequence, samples, blob, 0.5 * samples, samples - 1)


def commit(store: Store, evaluation_id: str, rank: int, *chunks: ChunkCommit) -> list[StoredChunk]:
    """Commit chunks that must all land (no conflict)."""
    out = store.commit_chunks(evaluation_id, rank, list(chunks))
    assert all(isinstance(s, StoredChunk) for s in out), out
    return [s for s in out if isinstance(s, StoredChunk)]


def conflict(store: Store, evaluation_id: str, rank: int, *chunks: ChunkCommit) -> SequenceConflict:
    """Commit chunks whose last one must be refused as a sequence conflict."""
    out = store.commit_chunks(evaluation_id, rank, list(chunks))
    assert isinstance(out[-1], SequenceConflict), out
    return out[-1]


def finalized(store: Store, step: int, model: str = "m", pin: bool = False) -> str:
    """An evaluation of one rank with one chunk, closed and finalized; its result names its step."""
    ev, _ = open_rank(store, step, model=model, pin=pin)
    commit(store, ev.evaluation_id, 0, chunk(0))
    store.close_shard(ev.evaluation_id, 0)
    store.finalize(ev.evaluation_id, f"result-{step}".encode(), f"records-{step}".encode(), 3)
    return ev.evaluation_id
