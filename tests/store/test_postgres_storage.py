"""The PostgreSQL schema stores per-sample records with lz4, or uncompressed where lz4 is missing.

Why it matters: PostgreSQL's default (pglz) runs over every value above ~2 kB in the
committing backend; records barely compress, so pglz burned ~20 ms of CPU per MB and
stored them uncompressed anyway, which made the database the limit of the records path.
lz4 costs what storing them uncompressed costs and writes less WAL (bench.replicas,
bench/RESULTS.md); a server built without lz4 stores them EXTERNAL (never compressed).
"""

from __future__ import annotations

import psycopg

from evalstream.service.store.postgres import PostgresStore
from evalstream.service.store.postgres_schema import records_storage

COMPRESSIBLE = b"\0" * 100_000


def stored(url: str) -> tuple[dict[str, str], tuple[object, ...] | None]:
    """(table.column -> attstorage) of the records columns, and how a compressible value was stored."""
    with psycopg.connect(url, autocommit=True) as conn:
        storage: dict[str, str] = dict(
            conn.execute(
                "SELECT c.relname || '.' || a.attname, a.attstorage FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE (c.relname, a.attname) IN (('chunks', 'records'), ('final_records', 'data'))"
            ).fetchall()
        )
        conn.execute(
            "INSERT INTO final_records (evaluation_id, piece, data) VALUES ('x', 0, %s)", (COMPRESSIBLE,)
        )
        row = conn.execute(
            "SELECT pg_column_compression(data), pg_column_size(data) < %s FROM final_records "
            "WHERE evaluation_id = 'x'",
            (len(COMPRESSIBLE),),
        ).fetchone()
    return storage, row


def test_records_are_compressed_with_lz4_where_the_server_has_it(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    storage, row = stored(postgres_url)
    assert storage == {"chunks.records": "x", "final_records.data": "x"}
    assert row == ("lz4", True)


def test_without_the_method_records_are_stored_external_uncompressed(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(records_storage("no_such_method"))  # type: ignore[arg-type]  # our own constant DDL
    storage, row = stored(postgres_url)
    assert storage == {"chunks.records": "e", "final_records.data": "e"}
    assert row == (None, False)
