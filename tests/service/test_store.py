"""The SQLite store on a real file: atomic commits, retention, pinning, concurrent group commit."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from evalstream.service.errors import FailedPrecondition, ResourceExhausted
from evalstream.service.store import (
    EvaluationKey,
    EvaluationRow,
    Rejection,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    SqliteStore,
)
from evalstream.v1 import evaluation_pb2


def _open(
    store: SqliteStore, step: int, rank: int = 0, world: int = 1, model: str = "m", pin: bool = False
) -> tuple[EvaluationRow, ShardRow]:
    key = EvaluationKey("r", model, "validation", step)
    return store.open_shard(ShardOpenRequest(key, rank, world, 10, "logits", 0, pin))


def _finalize(store: SqliteStore, step: int, keep: int, model: str = "m", pin: bool = False) -> str:
    ev, _ = _open(store, step, model=model, pin=pin)
    store.commit_chunk(ev.evaluation_id, 0, 0, 3, b"chunk", 1.5, 2, 100)
    store.close_shard(ev.evaluation_id, 0)
    result = evaluation_pb2.EvaluationResult(num_samples=3)
    result.metrics["nll"] = 0.5 + step
    store.finalize(ev.evaluation_id, result.SerializeToString(), f"records-{step}".encode(), 3, keep)
    return ev.evaluation_id


def test_commit_is_atomic_with_the_sequence(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    ev, shard = _open(store, 0)
    assert shard.next_sequence == 0
    with pytest.raises(SequenceConflict):
        store.commit_chunk(ev.evaluation_id, 0, 1, 3, b"x", 0.0, 0, 100)
    store.commit_chunk(ev.evaluation_id, 0, 0, 3, b"x", 1.0, 1, 100)
    with pytest.raises(SequenceConflict):
        store.commit_chunk(ev.evaluation_id, 0, 0, 3, b"x", 1.0, 1, 100)
    with pytest.raises(ResourceExhausted):
        store.commit_chunk(ev.evaluation_id, 0, 1, 98, b"y", 1.0, 1, 100)
    rejected = store.reject_chunk(ev.evaluation_id, 0, Rejection(1, "INVALID_ARGUMENT", "bad_shape", "why"))
    assert (rejected.next_sequence, rejected.samples, rejected.rejected_chunks) == (2, 3, 1)
    assert store.rejection(ev.evaluation_id, 0, 1) == Rejection(1, "INVALID_ARGUMENT", "bad_shape", "why")
    assert store.chunk_records(ev.evaluation_id) == [b"x"]
    store.close()

    reopened = SqliteStore(tmp_path)  # everything committed is there after a restart
    ev2, shard2 = _open(reopened, 0)
    assert ev2.evaluation_id == ev.evaluation_id and ev2.num_samples == 3
    assert (shard2.next_sequence, shard2.samples, shard2.nll_sum, shard2.correct) == (2, 3, 1.0, 1)
    progress = reopened.open_shards()
    assert [(e.key.step, s.rank, s.samples) for e, s in progress] == [(0, 0, 3)]
    reopened.close()


def test_open_checks_world_size_and_classes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    _open(store, 0, world=2)
    with pytest.raises(FailedPrecondition, match="world_size=2"):
        _open(store, 0, rank=1, world=3)
    store.close()


def test_retention_keeps_latest_and_pinned_records_but_every_metric(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    ids = {step: _finalize(store, step, keep=2, pin=(step == 0)) for step in range(5)}
    other = _finalize(store, 0, keep=2, model="other")
    kept = {step for step, i in ids.items() if store.final_records(i) is not None}
    assert kept == {0, 3, 4}  # step 0 is pinned; 3 and 4 are the latest two
    assert store.final_records(ids[4]) == b"records-4"
    assert store.final_records(other) == b"records-0"  # another series has its own retention
    for step, i in ids.items():
        row = store.get(i)
        assert row is not None and row.finalized
        assert row.records_available == (step in kept)
        result = evaluation_pb2.EvaluationResult.FromString(row.result or b"")
        assert result.metrics["nll"] == 0.5 + step
        assert store.chunk_records(i) == []
    files = sorted(p.name for p in (tmp_path / "records").iterdir())
    assert len(files) == 4
    # Unpinning lets retention drop step 0's records.
    store.set_pinned(ids[0], False, keep_latest=2)
    assert store.final_records(ids[0]) is None
    latest = {(v.key.model, v.step) for v in store.latest_finalized()}
    assert latest == {("m", 4), ("other", 0)}
    store.close()


def test_concurrent_writers_share_transactions_without_losing_a_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    shards = [_open(store, 0, rank=r, world=8)[0].evaluation_id for r in range(8)]
    errors: list[BaseException] = []

    def write(rank: int) -> None:
        try:
            for seq in range(25):
                store.commit_chunk(shards[rank], rank, seq, 1, b"r", 0.1, 1, 10**6)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [s.next_sequence for s in store.shards(shards[0])] == [25] * 8
    assert store.get(shards[0]).num_samples == 200  # type: ignore[union-attr]
    store.close()
