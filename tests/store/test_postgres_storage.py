"""The PostgreSQL schema stores per-sample records uncompressed, out of line.

Why it matters: PostgreSQL's default (EXTENDED) runs pglz over every value above
~2 kB in the committing backend; records barely compress, so pglz burned ~20 ms of
CPU per MB and stored them uncompressed anyway, which made the database the limit
of the records path (bench.replicas, bench/RESULTS.md). EXTERNAL skips it.
"""

from __future__ import annotations

import psycopg

from evalstream.service.store.postgres import PostgresStore


def test_records_columns_are_stored_external_and_stay_uncompressed(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        storage: dict[str, str] = dict(
            conn.execute(
                "SELECT c.relname || '.' || a.attname, a.attstorage FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE (c.relname, a.attname) IN (('chunks', 'records'), ('final_records', 'data'))"
            ).fetchall()
        )
        assert storage == {"chunks.records": "e", "final_records.data": "e"}
        # A compressible value too: stored as is, not compressed.
        conn.execute(
            "INSERT INTO final_records (evaluation_id, piece, data) VALUES ('x', 0, %s)", (b"\0" * 100_000,)
        )
        row = conn.execute(
            "SELECT pg_column_compression(data), pg_column_size(data) FROM final_records "
            "WHERE evaluation_id = 'x'"
        ).fetchone()
    assert row == (None, 100_000)
