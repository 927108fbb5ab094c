"""The SQLite store's reads: row mapping and every query that only reads.

Reads use one connection per thread (WAL readers never block the writer), so a
scrape or a GetEvaluation never waits behind a commit. The writer's
transactions use ``eval_in`` / ``shard_in`` on its own connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

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
from evalstream.service.store.sqlite_schema import connect

EVAL_COLUMNS = (
    "e.id, e.run, e.model, e.split, e.step, e.state, e.world_size, e.num_classes, e.score_kind, "
    "e.dataset_size, e.created_at, e.finalized_at, e.num_samples, e.pinned, e.records_available, e.result, "
    "(SELECT COUNT(*) FROM shards s WHERE s.evaluation_id = e.id AND s.closed = 1) AS ranks_closed"
)
SHARD_COLUMNS = (
    "evaluation_id, rank, next_sequence, samples, chunks, rejected, closed, nll_sum, correct, updated_at"
)
# The latest finalized step of each (run, model, split) a row belongs to.
LATEST_STEP = (
    "e.step = (SELECT MAX(step) FROM evaluations x WHERE x.run = e.run AND x.model = e.model "
    "AND x.split = e.split AND x.state = ?)"
)


def evaluation(row: sqlite3.Row) -> EvaluationRow:
    return EvaluationRow(
        evaluation_id=row["id"],
        key=EvaluationKey(row["run"], row["model"], row["split"], row["step"]),
        state=row["state"],
        world_size=row["world_size"],
        num_classes=row["num_classes"],
        score_kind=row["score_kind"],
        dataset_size=row["dataset_size"],
        created_at=row["created_at"],
        finalized_at=row["finalized_at"],
        num_samples=row["num_samples"],
        ranks_closed=row["ranks_closed"],
        pinned=bool(row["pinned"]),
        records_available=bool(row["records_available"]),
        result=None if row["result"] is None else bytes(row["result"]),
    )


def shard(row: sqlite3.Row) -> ShardRow:
    return ShardRow(
        evaluation_id=row["evaluation_id"],
        rank=row["rank"],
        next_sequence=row["next_sequence"],
        samples=row["samples"],
        chunks=row["chunks"],
        rejected_chunks=row["rejected"],
        closed=bool(row["closed"]),
        nll_sum=row["nll_sum"],
        correct=row["correct"],
        updated_at=row["updated_at"],
    )


def eval_in(conn: sqlite3.Connection, evaluation_id: str) -> EvaluationRow:
    row = conn.execute(
        f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.id = ?", (evaluation_id,)
    ).fetchone()
    if row is None:
        raise NotFound(evaluation_id)
    return evaluation(row)


def shard_in(conn: sqlite3.Connection, evaluation_id: str, rank: int) -> ShardRow:
    row = conn.execute(
        f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = ? AND rank = ?", (evaluation_id, rank)
    ).fetchone()
    if row is None:
        raise NotFound(evaluation_id, rank)
    return shard(row)


class SqliteReads:
    """The read half of ``SqliteStore``: a connection per reading thread over ``path``."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path
        self._synchronous = synchronous
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def _read(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self._synchronous)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _close_readers(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._readers.clear()

    def rejection(self, evaluation_id: str, rank: int, sequence: int) -> Rejection | None:
        row = (
            self._read()
            .execute(
                "SELECT sequence, reason, message FROM rejections "
                "WHERE evaluation_id = ? AND rank = ? AND sequence = ?",
                (evaluation_id, rank, sequence),
            )
            .fetchone()
        )
        return None if row is None else Rejection(row["sequence"], row["reason"], row["message"])

    def chunk_digest(self, evaluation_id: str, rank: int, sequence: int) -> bytes | None:
        row = (
            self._read()
            .execute(
                "SELECT digest FROM chunks WHERE evaluation_id = ? AND rank = ? AND sequence = ? UNION ALL "
                "SELECT digest FROM rejections WHERE evaluation_id = ? AND rank = ? AND sequence = ?",
                (evaluation_id, rank, sequence) * 2,
            )
            .fetchone()
        )
        return None if row is None or row["digest"] is None else bytes(row["digest"])

    def chunk_records(self, evaluation_id: str) -> list[bytes]:
        rows = self._read().execute(
            "SELECT records FROM chunks WHERE evaluation_id = ? AND records IS NOT NULL "
            "ORDER BY rank, sequence",
            (evaluation_id,),
        )
        return [bytes(r["records"]) for r in rows]

    def get(self, evaluation_id: str) -> EvaluationRow | None:
        row = self._read().execute(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.id = ?", (evaluation_id,)
        )
        found = row.fetchone()
        return None if found is None else evaluation(found)

    def find(self, run: str, model: str, split: str, step: int | None) -> EvaluationRow | None:
        sql, args = queries.find_evaluation(EVAL_COLUMNS, "?", run, model, split, step)
        found = self._read().execute(sql, args).fetchone()
        return None if found is None else evaluation(found)

    def list_evaluations(
        self, run: str = "", model: str = "", split: str = "", limit: int = 50, before: int | None = None
    ) -> tuple[list[EvaluationRow], int | None]:
        sql, args = queries.list_evaluations(EVAL_COLUMNS, "?", run, model, split, limit, before)
        shown, cursor = queries.page(self._read().execute(sql, args).fetchall(), limit)
        return [evaluation(r) for r in shown], cursor

    def latest_per_model(self, run: str, split: str) -> list[EvaluationRow]:
        rows = self._read().execute(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.run = ? AND e.split = ? AND e.state = ? "
            f"AND {LATEST_STEP} ORDER BY e.model",
            (run, split, FINALIZED, FINALIZED),
        )
        return [evaluation(r) for r in rows]

    def shards(self, evaluation_id: str) -> list[ShardRow]:
        rows = self._read().execute(
            f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = ? ORDER BY rank", (evaluation_id,)
        )
        return [shard(r) for r in rows]

    def open_shards(self) -> list[tuple[EvaluationRow, ShardRow]]:
        conn = self._read()
        evals = {
            r["id"]: evaluation(r)
            for r in conn.execute(f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = ?", (OPEN,))
        }
        if not evals:
            return []
        rows = conn.execute(
            f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id IN "
            "(SELECT id FROM evaluations WHERE state = ?) ORDER BY evaluation_id, rank",
            (OPEN,),
        )
        return [(evals[r["evaluation_id"]], shard(r)) for r in rows if r["evaluation_id"] in evals]

    def pending_finalize(self) -> list[EvaluationRow]:
        rows = self._read().execute(f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = ?", (OPEN,))
        return [ev for ev in map(evaluation, rows) if ev.ranks_closed >= ev.world_size]

    def latest_finalized(self) -> list[EvaluationRow]:
        rows = self._read().execute(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = ? AND {LATEST_STEP} "
            "ORDER BY e.finalized_at DESC",
            (FINALIZED, FINALIZED),
        )
        return [evaluation(r) for r in rows]
