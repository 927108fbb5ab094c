"""The SQLite store on a real file: atomic commits, retention, pinning, concurrent group commit."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from evalstream.service.errors import FailedPrecondition, ResourceExhausted
from evalstream.service.store import (
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    SqliteStore,
    Store,
    StoredChunk,
)
from evalstream.service.store import sqlite as sqlite_store
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


def _block(first: int) -> list[ChunkCommit]:
    """A staging block's worth of chunks: commits, one in-band rejection, one over max_samples (100)."""
    bad = Rejection(first + 2, "INVALID_ARGUMENT", "non_finite", "a NaN")
    return [
        ChunkCommit(first, 30, b"a", 0.1, 3),
        ChunkCommit(first + 1, 40, b"b", 0.2, 4),
        ChunkCommit(first + 2, rejection=bad),
        ChunkCommit(first + 3, 50, b"c", 0.3, 5),  # 70 + 50 > 100: refused as evaluation_too_large
        ChunkCommit(first + 4, 20, None, 0.4, 6),
    ]


def test_commit_chunks_equals_one_call_per_chunk_in_one_transaction(tmp_path: Path) -> None:
    """SqliteStore.commit_chunks (one transaction) leaves exactly what the Store default (one
    commit_chunk / reject_chunk call per chunk) leaves, chunk by chunk and in the database."""
    fast, slow = SqliteStore(tmp_path / "fast"), SqliteStore(tmp_path / "slow")
    ev_fast, _ = _open(fast, 0)
    ev_slow, _ = _open(slow, 0)
    got = fast.commit_chunks(ev_fast.evaluation_id, 0, _block(0), 100)
    want = Store.commit_chunks(slow, ev_slow.evaluation_id, 0, _block(0), 100)
    assert all(isinstance(s, StoredChunk) for s in got) and len(got) == 5

    def strip(items: list[StoredChunk | SequenceConflict]) -> list[tuple[object, ...]]:
        return [
            (
                s.shard.next_sequence,
                s.shard.samples,
                s.shard.chunks,
                s.shard.rejected_chunks,
                round(s.shard.nll_sum, 12),
                s.shard.correct,
                s.rejection and s.rejection.reason,
            )
            for s in items
            if isinstance(s, StoredChunk)
        ]

    assert strip(got) == strip(want)
    assert [x[-1] for x in strip(got)] == [None, None, "non_finite", "evaluation_too_large", None]
    too_large = fast.rejection(ev_fast.evaluation_id, 0, 3)
    assert too_large is not None and too_large.code == "RESOURCE_EXHAUSTED"
    assert "max_samples_per_evaluation=100" in too_large.message
    assert too_large == slow.rejection(ev_slow.evaluation_id, 0, 3)
    assert (
        fast.chunk_records(ev_fast.evaluation_id) == [b"a", b"b"] == slow.chunk_records(ev_slow.evaluation_id)
    )
    for store, ev in ((fast, ev_fast), (slow, ev_slow)):
        row = store.get(ev.evaluation_id)
        assert row is not None and row.num_samples == 90
    # A conflict stops the block: chunks before it are committed, nothing after it.
    mixed = [
        ChunkCommit(5, 1, b"d", 0.0, 0),
        ChunkCommit(7, 1, b"e", 0.0, 0),
        ChunkCommit(8, 1, b"f", 0.0, 0),
    ]
    out = fast.commit_chunks(ev_fast.evaluation_id, 0, mixed, 100)
    assert len(out) == 2 and isinstance(out[0], StoredChunk) and isinstance(out[1], SequenceConflict)
    assert (out[1].expected, out[1].got) == (6, 7)
    assert fast.chunk_records(ev_fast.evaluation_id) == [b"a", b"b", b"d"]
    # A closed shard commits nothing of the block.
    fast.close_shard(ev_fast.evaluation_id, 0)
    with pytest.raises(FailedPrecondition):
        fast.commit_chunks(ev_fast.evaluation_id, 0, [ChunkCommit(6, 1, b"g", 0.0, 0)], 100)
    fast.close()
    slow.close()

    reopened = SqliteStore(tmp_path / "fast")  # durable: the block's rows are there after a restart
    (shard,) = reopened.shards(ev_fast.evaluation_id)
    assert (shard.next_sequence, shard.samples, shard.chunks, shard.rejected_chunks) == (6, 91, 4, 2)
    reopened.close()


BLOB = 6400  # one ~87-sample chunk's records, as ingest stores them
CHUNKS = 1200  # ~7.3 MiB of chunk blobs: several reclaim steps


def _db_bytes(data_dir: Path) -> int:
    """What the database costs on disk: the file plus its WAL (the -shm index is a fixed 32 KiB map)."""
    return sum(p.stat().st_size for p in data_dir.glob("evalstream.db*") if not p.name.endswith("-shm"))


def _stream_and_finalize(store: SqliteStore, step: int, blob: bool) -> str:
    """Commit CHUNKS chunks in staging blocks (random blobs, or none), close the rank, finalize."""
    ev, _ = _open(store, step)
    for first in range(0, CHUNKS, 100):
        block = [
            ChunkCommit(s, 87, os.urandom(BLOB) if blob else None, 0.1, 1) for s in range(first, first + 100)
        ]
        store.commit_chunks(ev.evaluation_id, 0, block, 10**9)
    store.close_shard(ev.evaluation_id, 0)
    store.finalize(ev.evaluation_id, b"result", b"records", 87 * CHUNKS, 5)
    return ev.evaluation_id


def test_finalize_gives_the_chunk_blobs_disk_space_back(tmp_path: Path) -> None:
    """After a finalize the database (file + WAL) shrinks to what a store that never held the blobs
    takes for the same rows, within a few pages; nothing is lost on the way."""
    store = SqliteStore(tmp_path / "blobs")
    assert store.reclaims_space
    ev, _ = _open(store, 0)
    grown = 0
    for first in range(0, CHUNKS, 100):
        block = [ChunkCommit(s, 87, os.urandom(BLOB), 0.1, 1) for s in range(first, first + 100)]
        store.commit_chunks(ev.evaluation_id, 0, block, 10**9)
        grown = max(grown, _db_bytes(tmp_path / "blobs"))
    assert grown > CHUNKS * BLOB  # the blobs really were on disk
    store.close_shard(ev.evaluation_id, 0)
    store.finalize(ev.evaluation_id, b"result", b"records", 87 * CHUNKS, 5)
    # Ingest goes on while the reclaim runs: another evaluation's chunks land intact.
    other, _ = _open(store, 1)
    blobs = [os.urandom(BLOB) for _ in range(20)]
    for s, b in enumerate(blobs):
        store.commit_chunk(other.evaluation_id, 0, s, 87, b, 0.1, 1, 10**9)
    assert store.wait_reclaimed(timeout=30)
    store.commit_chunk(other.evaluation_id, 0, 20, 87, None, 0.1, 1, 10**9)  # the checkpoint runs once idle
    assert store.chunk_records(other.evaluation_id) == blobs
    assert store.final_records(ev.evaluation_id) == b"records" and store.chunk_records(ev.evaluation_id) == []
    store.close()

    # The reference: the same rows, the other evaluation's blobs included, but no finalized blobs.
    reference = SqliteStore(tmp_path / "reference")
    _stream_and_finalize(reference, 0, blob=False)
    ref_other, _ = _open(reference, 1)
    for s, b in enumerate(blobs):
        reference.commit_chunk(ref_other.evaluation_id, 0, s, 87, b, 0.1, 1, 10**9)
    reference.commit_chunk(ref_other.evaluation_id, 0, 20, 87, None, 0.1, 1, 10**9)
    reference.close()

    reopened = SqliteStore(tmp_path / "blobs")
    assert reopened.wait_reclaimed(timeout=30)
    conn = sqlite3.connect(tmp_path / "blobs" / "evalstream.db")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    conn.close()
    assert reopened.chunk_records(other.evaluation_id) == blobs
    reopened.close()
    after, want = _db_bytes(tmp_path / "blobs"), _db_bytes(tmp_path / "reference")
    assert after <= want + 8 * page, (after, want, grown)


def test_a_running_store_truncates_the_wal_after_the_reclaim(tmp_path: Path) -> None:
    """While the server still runs (no close to checkpoint it), the WAL is cut to nothing and the
    database file holds the remaining rows only."""
    store = SqliteStore(tmp_path)
    _stream_and_finalize(store, 0, blob=True)
    assert store.wait_reclaimed(timeout=30)
    ev, _ = _open(store, 1)  # one more write lets the idle writer run its checkpoint after the reclaim
    store.commit_chunk(ev.evaluation_id, 0, 0, 87, None, 0.1, 1, 10**9)
    wal = tmp_path / "evalstream.db-wal"
    assert wal.stat().st_size < 64 * 1024
    assert _db_bytes(tmp_path) < CHUNKS * BLOB / 20
    store.close()


def test_reclaim_resumes_on_restart_where_a_crash_left_free_pages(tmp_path: Path) -> None:
    """A crash between the finalize and the end of the reclaim leaves free pages; the next start
    gives them back."""
    store = SqliteStore(tmp_path)
    ev, _ = _open(store, 0)
    block = [ChunkCommit(s, 87, os.urandom(BLOB), 0.1, 1) for s in range(300)]
    store.commit_chunks(ev.evaluation_id, 0, block, 10**9)
    store.close()
    conn = sqlite3.connect(tmp_path / "evalstream.db")  # the finalize's delete, without the reclaim
    conn.execute("DELETE FROM chunks")
    conn.commit()
    freed = conn.execute("PRAGMA freelist_count").fetchone()[0]
    conn.close()
    assert freed * 4096 >= 300 * BLOB * 0.9
    reopened = SqliteStore(tmp_path)
    assert reopened.wait_reclaimed(timeout=30)
    reopened.close()
    conn = sqlite3.connect(tmp_path / "evalstream.db")
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    conn.close()
    assert _db_bytes(tmp_path) < 300 * BLOB / 10


def test_a_database_made_without_auto_vacuum_keeps_working_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = sqlite3.connect(tmp_path / "evalstream.db")
    old.executescript(sqlite_store.SCHEMA)  # an older server's database: tables made before the pragma
    old.close()
    with caplog.at_level(logging.WARNING, logger=sqlite_store.__name__):
        store = SqliteStore(tmp_path)
    assert not store.reclaims_space
    assert any("without incremental auto-vacuum" in r.getMessage() for r in caplog.records)
    evaluation_id = _stream_and_finalize(store, 0, blob=True)
    assert store.wait_reclaimed(timeout=30)
    row = store.get(evaluation_id)
    assert row is not None and row.finalized and store.final_records(evaluation_id) == b"records"
    assert store.chunk_records(evaluation_id) == []
    # Its free pages are reused by the next evaluation's chunks instead of growing the file.
    before = (tmp_path / "evalstream.db").stat().st_size
    store.close()
    again = SqliteStore(tmp_path)
    _stream_and_finalize(again, 1, blob=True)
    again.close()
    assert (tmp_path / "evalstream.db").stat().st_size <= before * 1.05
