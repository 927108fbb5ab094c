"""The PostgreSQL store's reads: row mapping, the connection pool, every query that only reads.

Reads take a pooled connection for one statement (or one short transaction) and
give it back, so a scrape or a GetEvaluation on one replica never waits behind
another replica's commit (MVCC readers do not block writers). The open
evaluations' sample count is summed from their shards rather than kept on the
evaluation row: concurrent commits of different ranks then lock only their own
shard rows and proceed in parallel, instead of queueing on the evaluation row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from evalstream.service.store import queries
from evalstream.service.store.base import (
    FINALIZED,
    OPEN,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    ShardRow,
)
from evalstream.service.store.errors import NotFound

T = TypeVar("T")
Row = dict[str, Any]

# Sample count of an evaluation: its shards' sum while open, the merged (deduplicated) count once final.
NUM_SAMPLES = (
    "CASE WHEN e.state = 'open' THEN (SELECT COALESCE(SUM(s.samples), 0) FROM shards s "
    "WHERE s.evaluation_id = e.id) ELSE e.num_samples END AS num_samples"
)
EVAL_COLUMNS = (
    "e.id, e.run, e.model, e.split, e.step, e.state, e.world_size, e.num_classes, e.score_kind, "
    f"e.dataset_size, e.created_at, e.finalized_at, {NUM_SAMPLES}, e.closed, e.pinned, "
    "e.records_available, e.result"
)
SHARD_COLUMNS = (
    "evaluation_id, rank, next_sequence, samples, chunks, rejected, closed, nll_sum, correct, updated_at"
)
LATEST_STEP = (
    "e.step = (SELECT MAX(step) FROM evaluations x WHERE x.run = e.run AND x.model = e.model "
    "AND x.split = e.split AND x.state = 'finalized')"
)
# The database clock as the epoch seconds every timestamp column holds (one clock for all replicas).
NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
# How long a store call keeps retrying while the database is unreachable (a restart, a failover).
RETRY_WINDOW_S = 60.0
# Failures after which the same call, retried, is safe and likely to succeed.
RETRYABLE = (
    psycopg.OperationalError,
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
)


def evaluation(row: Row) -> EvaluationRow:
    return EvaluationRow(
        evaluation_id=row["id"],
        key=EvaluationKey(row["run"], row["model"], row["split"], int(row["step"])),
        state=row["state"],
        world_size=row["world_size"],
        num_classes=row["num_classes"],
        score_kind=row["score_kind"],
        dataset_size=int(row["dataset_size"]),
        created_at=row["created_at"],
        finalized_at=row["finalized_at"],
        num_samples=int(row["num_samples"]),
        ranks_closed=row["closed"],
        pinned=row["pinned"],
        records_available=row["records_available"],
        result=None if row["result"] is None else bytes(row["result"]),
    )


def shard(row: Row) -> ShardRow:
    return ShardRow(
        evaluation_id=row["evaluation_id"],
        rank=row["rank"],
        next_sequence=int(row["next_sequence"]),
        samples=int(row["samples"]),
        chunks=int(row["chunks"]),
        rejected_chunks=int(row["rejected"]),
        closed=row["closed"],
        nll_sum=row["nll_sum"],
        correct=int(row["correct"]),
        updated_at=row["updated_at"],
    )


def eval_in(conn: psycopg.Connection[Row], evaluation_id: str, lock: str = "") -> EvaluationRow:
    """The evaluation row inside a transaction; ``lock`` is "" or a locking clause (FOR SHARE)."""
    row = conn.execute(f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.id = %s {lock}", (evaluation_id,))
    found = row.fetchone()
    if found is None:
        raise NotFound(evaluation_id)
    return evaluation(found)


def shard_in(conn: psycopg.Connection[Row], evaluation_id: str, rank: int, lock: str = "") -> ShardRow:
    found = conn.execute(
        f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = %s AND rank = %s {lock}",
        (evaluation_id, rank),
    ).fetchone()
    if found is None:
        raise NotFound(evaluation_id, rank)
    return shard(found)


def make_pool(url: str, max_size: int) -> ConnectionPool[psycopg.Connection[Row]]:
    """A pool of ``max_size`` connections (ingest runs up to 16 store calls at once)."""
    pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": True},
        # A connection the database dropped (a restart) is noticed when taken, not mid-call.
        check=ConnectionPool.check_connection,
        timeout=RETRY_WINDOW_S,
        reconnect_timeout=RETRY_WINDOW_S * 5,
        open=False,
        name="evalstream-store",
    )
    pool.open(wait=True, timeout=RETRY_WINDOW_S)
    return pool


class PostgresReads:
    """Reads over a pool; ``_run`` is the one way any call (read or write) reaches the database."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Row]]) -> None:
        self._pool = pool

    def _run(self, op: Callable[[psycopg.Connection[Row]], T]) -> T:
        """Run ``op`` in one transaction, retrying while the database is unreachable or a lock
        conflict aborted it. Every write is safe to run again: a chunk's sequence is inserted only
        if absent, a close only counts once, a finalize only applies to an open evaluation."""
        deadline = time.monotonic() + RETRY_WINDOW_S
        delay = 0.05
        while True:
            try:
                with self._pool.connection() as conn, conn.transaction():
                    return op(conn)
            except RETRYABLE:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Row]]:
        with self._pool.connection() as conn:
            yield conn

    def _rows(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[Row]:
        return self._run(lambda conn: conn.execute(sql, args).fetchall())  # type: ignore[arg-type]

    def rejection(self, evaluation_id: str, rank: int, sequence: int) -> Rejection | None:
        rows = self._rows(
            "SELECT sequence, reason, message FROM rejections "
            "WHERE evaluation_id = %s AND rank = %s AND sequence = %s",
            (evaluation_id, rank, sequence),
        )
        if not rows:
            return None
        return Rejection(int(rows[0]["sequence"]), rows[0]["reason"], rows[0]["message"])

    def chunk_digest(self, evaluation_id: str, rank: int, sequence: int) -> bytes | None:
        rows = self._rows(
            "SELECT digest FROM chunks WHERE evaluation_id = %s AND rank = %s AND sequence = %s UNION ALL "
            "SELECT digest FROM rejections WHERE evaluation_id = %s AND rank = %s AND sequence = %s",
            (evaluation_id, rank, sequence) * 2,
        )
        return None if not rows or rows[0]["digest"] is None else bytes(rows[0]["digest"])

    def chunk_records(self, evaluation_id: str) -> list[bytes]:
        rows = self._rows(
            "SELECT records FROM chunks WHERE evaluation_id = %s AND records IS NOT NULL "
            "ORDER BY rank, sequence",
            (evaluation_id,),
        )
        return [bytes(r["records"]) for r in rows]

    def get(self, evaluation_id: str) -> EvaluationRow | None:
        rows = self._rows(f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.id = %s", (evaluation_id,))
        return evaluation(rows[0]) if rows else None

    def find(self, run: str, model: str, split: str, step: int | None) -> EvaluationRow | None:
        sql, args = queries.find_evaluation(EVAL_COLUMNS, "%s", run, model, split, step)
        rows = self._rows(sql, args)
        return evaluation(rows[0]) if rows else None

    def list_evaluations(
        self, run: str = "", model: str = "", split: str = "", limit: int = 50, before: int | None = None
    ) -> tuple[list[EvaluationRow], int | None]:
        sql, args = queries.list_evaluations(EVAL_COLUMNS, "%s", run, model, split, limit, before)
        shown, cursor = queries.page(self._rows(sql, args), limit)
        return [evaluation(r) for r in shown], cursor

    def latest_per_model(self, run: str, split: str) -> list[EvaluationRow]:
        rows = self._rows(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.run = %s AND e.split = %s "
            f"AND e.state = %s AND {LATEST_STEP} ORDER BY e.model",
            (run, split, FINALIZED),
        )
        return [evaluation(r) for r in rows]

    def shards(self, evaluation_id: str) -> list[ShardRow]:
        rows = self._rows(
            f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = %s ORDER BY rank", (evaluation_id,)
        )
        return [shard(r) for r in rows]

    def open_shards(self) -> list[tuple[EvaluationRow, ShardRow]]:
        def op(conn: psycopg.Connection[Row]) -> list[tuple[EvaluationRow, ShardRow]]:
            evals = {
                r["id"]: evaluation(r)
                for r in conn.execute(
                    f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = %s", (OPEN,)
                ).fetchall()
            }
            if not evals:
                return []
            rows = conn.execute(
                f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = ANY(%s) "
                "ORDER BY evaluation_id, rank",
                (list(evals),),
            ).fetchall()
            return [(evals[r["evaluation_id"]], shard(r)) for r in rows]

        return self._run(op)

    def pending_finalize(self) -> list[EvaluationRow]:
        rows = self._rows(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = %s AND e.closed >= e.world_size",
            (OPEN,),
        )
        return [evaluation(r) for r in rows]

    def latest_finalized(self) -> list[EvaluationRow]:
        rows = self._rows(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = %s AND {LATEST_STEP} "
            "ORDER BY e.finalized_at DESC",
            (FINALIZED,),
        )
        return [evaluation(r) for r in rows]

    def final_records(self, evaluation_id: str) -> bytes | None:
        def op(conn: psycopg.Connection[Row]) -> bytes | None:
            ev = conn.execute(
                "SELECT state, records_available FROM evaluations WHERE id = %s", (evaluation_id,)
            ).fetchone()
            if ev is None or ev["state"] != FINALIZED or not ev["records_available"]:
                return None
            pieces = conn.execute(
                "SELECT data FROM final_records WHERE evaluation_id = %s ORDER BY piece", (evaluation_id,)
            ).fetchall()
            return b"".join(bytes(p["data"]) for p in pieces)

        return self._run(op)
