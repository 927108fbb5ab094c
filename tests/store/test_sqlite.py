"""The SQLite backend beyond the contract: it gives the disk space of finalized chunks back."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

from evalstream.service.store import (
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    ShardOpenRequest,
    ShardRow,
    SqliteStore,
    StorePolicy,
    sqlite_schema,
)

POLICY = StorePolicy(max_samples_per_evaluation=10**9, retention_keep_latest=5)


def _open(store: SqliteStore, step: int) -> tuple[EvaluationRow, ShardRow]:
    key = EvaluationKey("r", "m", "validation", step)
    return store.open_shard(ShardOpenRequest(key, 0, 1, 10, "logits", 0, False))


def _commit(store: SqliteStore, evaluation_id: str, sequence: int, blob: bytes | None) -> None:
    store.commit_chunks(evaluation_id, 0, [ChunkCommit(sequence, 87, blob, 0.1, 1)])


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
        store.commit_chunks(ev.evaluation_id, 0, block)
    store.close_shard(ev.evaluation_id, 0)
    store.finalize(ev.evaluation_id, b"result", b"records", 87 * CHUNKS)
    return ev.evaluation_id


def test_finalize_gives_the_chunk_blobs_disk_space_back(tmp_path: Path) -> None:
    """After a finalize the database (file + WAL) shrinks to what a store that never held the blobs
    takes for the same rows, within a few pages; nothing is lost on the way."""
    store = SqliteStore(tmp_path / "blobs", policy=POLICY)
    assert store.reclaims_space
    ev, _ = _open(store, 0)
    grown = 0
    for first in range(0, CHUNKS, 100):
        block = [ChunkCommit(s, 87, os.urandom(BLOB), 0.1, 1) for s in range(first, first + 100)]
        store.commit_chunks(ev.evaluation_id, 0, block)
        grown = max(grown, _db_bytes(tmp_path / "blobs"))
    assert grown > CHUNKS * BLOB  # the blobs really were on disk
    store.close_shard(ev.evaluation_id, 0)
    store.finalize(ev.evaluation_id, b"result", b"records", 87 * CHUNKS)
    # Ingest goes on while the reclaim runs: another evaluation's chunks land intact.
    other, _ = _open(store, 1)
    blobs = [os.urandom(BLOB) for _ in range(20)]
    for s, b in enumerate(blobs):
        _commit(store, other.evaluation_id, s, b)
    assert store.wait_reclaimed(timeout=30)
    _commit(store, other.evaluation_id, 20, None)  # the checkpoint runs once idle
    assert store.chunk_records(other.evaluation_id) == blobs
    assert store.final_records(ev.evaluation_id) == b"records" and store.chunk_records(ev.evaluation_id) == []
    store.close()

    # The reference: the same rows, the other evaluation's blobs included, but no finalized blobs.
    reference = SqliteStore(tmp_path / "reference")
    _stream_and_finalize(reference, 0, blob=False)
    ref_other, _ = _open(reference, 1)
    for s, b in enumerate(blobs):
        _commit(reference, ref_other.evaluation_id, s, b)
    _commit(reference, ref_other.evaluation_id, 20, None)
    reference.close()

    reopened = SqliteStore(tmp_path / "blobs", policy=POLICY)
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
    _commit(store, ev.evaluation_id, 0, None)
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
    store.commit_chunks(ev.evaluation_id, 0, block)
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
    for statement in sqlite_schema.V1:  # an older server's database: tables made before the pragma
        old.execute(statement)
    old.close()
    with caplog.at_level(logging.WARNING, logger=sqlite_schema.__name__):
        store = SqliteStore(tmp_path)
    assert not store.reclaims_space
    assert any("without incremental auto-vacuum" in r.getMessage() for r in caplog.records)
    evaluation_id = _stream_and_finalize(store, 0, blob=True)
    assert store.wait_reclaimed(timeout=30)
    row = store.get(evaluation_id)
    assert row is not None and row.finalized and store.final_records(evaluation_id) == b"records"
    assert store.chunk_records(evaluation_id) == []
    # Its free pages are reused by the next evaluation's chunks instead of growing the file. The size
    # is read once closed: only then is every page in the file (the WAL is copied into it beside
    # the writer, so a running store's file can lag its last commits).
    store.close()
    before = (tmp_path / "evalstream.db").stat().st_size
    again = SqliteStore(tmp_path)
    _stream_and_finalize(again, 1, blob=True)
    again.close()
    assert (tmp_path / "evalstream.db").stat().st_size <= before * 1.05
