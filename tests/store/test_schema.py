"""The SQLite schema is versioned: a database an older server wrote is upgraded at start, losing
nothing, and a database from a newer server is refused instead of misread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest

from evalstream.service.errors import status_of
from evalstream.service.store import ChunkCommit, Rejection, SchemaTooNew, SqliteStore
from evalstream.service.store.sqlite_schema import LATEST
from evalstream.v1 import evaluation_pb2

FIXTURE = Path(__file__).parent / "fixtures" / "schema_v1.sql"
FINALIZED_ID = "5f1e0000000000000000000000000001"
OPEN_ID = "0be00000000000000000000000000002"


def _version_1_database(data_dir: Path) -> Path:
    """The database and records file a version-1 server left in ``data_dir``."""
    (data_dir / "records").mkdir(parents=True)
    (data_dir / "records" / f"{FINALIZED_ID}.evrec").write_bytes(b"merged records")
    db = data_dir / "evalstream.db"
    conn = sqlite3.connect(db)
    conn.executescript(FIXTURE.read_text())
    conn.close()
    return db


def _version(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_version_1_database_is_upgraded_without_losing_an_evaluation(tmp_path: Path) -> None:
    db = _version_1_database(tmp_path)
    assert _version(db) == 0
    store = SqliteStore(tmp_path)
    assert _version(db) == LATEST == 3
    conn = sqlite3.connect(db)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(rejections)")]
    chunk_columns = [r[1] for r in conn.execute("PRAGMA table_info(chunks)")]
    conn.close()
    # No gRPC code stored (v2); the digest of the received input kept with every chunk (v3).
    assert columns == ["evaluation_id", "rank", "sequence", "reason", "message", "digest"]
    assert chunk_columns[-1] == "digest"

    done = store.get(FINALIZED_ID)
    assert done is not None and done.finalized and done.pinned and done.num_samples == 3
    result = evaluation_pb2.EvaluationResult.FromString(done.result or b"")
    assert result.num_samples == 3 and result.metrics["nll"] == 0.5
    assert store.final_records(FINALIZED_ID) == b"merged records"
    assert [e.evaluation_id for e in store.latest_finalized()] == [FINALIZED_ID]

    assert store.rejection(OPEN_ID, 0, 2) == Rejection(2, "non_finite", "chunk 2 has a NaN in scores row 4")
    assert store.chunk_records(OPEN_ID) == [b"\x0a\x0b\x0c", b"\x0d\x0e\x0f"]
    assert store.chunk_digest(OPEN_ID, 0, 0) is None  # committed before digests: judges nothing
    assert [(s.rank, s.next_sequence, s.samples, s.closed) for s in store.shards(OPEN_ID)] == [
        (0, 3, 5, False),
        (1, 0, 0, True),
    ]
    # The open evaluation goes on where it stood and finalizes.
    (stored,) = store.commit_chunks(OPEN_ID, 0, [ChunkCommit(3, 4, b"\x10", 1.0, 2, digest=b"\x01d")])
    assert not isinstance(stored, Exception) and stored.shard.samples == 9
    assert store.chunk_digest(OPEN_ID, 0, 3) == b"\x01d"
    assert store.close_shard(OPEN_ID, 0).ranks_closed == 2
    assert store.finalize(OPEN_ID, b"result", b"records", 9).finalized
    store.close()

    again = SqliteStore(tmp_path)  # an upgraded database opens as it is
    assert _version(db) == LATEST and again.final_records(OPEN_ID) == b"records"
    again.close()


def test_a_database_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "evalstream.db")
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew) as refused:
        SqliteStore(tmp_path)
    assert (refused.value.found, refused.value.supported) == (LATEST + 1, LATEST)
    code, message = status_of(refused.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "newer server" in message
