"""The embedded store: SQLite in WAL mode, one writer thread with group commit, records files beside it.

Why one writer thread: SQLite allows one writer at a time anyway; funnelling
writes through one thread lets it commit every write that queued up while the
previous transaction was syncing in a single transaction (group commit), so
many concurrent streams cost one sync instead of one each. A caller's write
returns only after its transaction committed. Each write runs inside its own
savepoint, so a write that fails (a sequence conflict) never takes its batch
neighbours down with it.

Reads use one connection per thread (WAL readers never block the writer).
Finalized per-sample records live in ``records/<evaluation_id>.evrec`` files,
written atomically (temp file, fsync, rename) before the row points at them.

Why the store gives space back: a finalize deletes the evaluation's chunk blobs
(the merged records went to the records file), which would otherwise stay in
the database as free pages for good. New databases are created with
``auto_vacuum=INCREMENTAL``; after a finalize the writer thread frees those
pages a bounded step at a time, each step queued behind the writes already
waiting so ingest never stalls behind a whole reclaim, and once the free list
is empty and no write waits it truncates the WAL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from evalstream.service.errors import FailedPrecondition, NotFound, ResourceExhausted
from evalstream.service.status import FinalizedView, SeriesKey
from evalstream.service.store.base import (
    FINALIZED,
    OPEN,
    TOO_LARGE,
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    Store,
    StoredChunk,
)
from evalstream.v1 import evaluation_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BATCH = 256
# Pages one reclaim step frees (2 MiB at the default 4 KiB page): ~10 ms of writer time on a 2-core box.
VACUUM_STEP_PAGES = 512
# The WAL is cut back to this size whenever a checkpoint restarts it, whatever a big transaction grew it to.
JOURNAL_SIZE_LIMIT = 16 * 2**20
# How long a WAL-truncating checkpoint waits for readers before it gives up until the next reclaim.
CHECKPOINT_BUSY_MS = 200
BUSY_TIMEOUT_MS = 30_000
INCREMENTAL = 2  # PRAGMA auto_vacuum value

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    run TEXT NOT NULL, model TEXT NOT NULL, split TEXT NOT NULL, step INTEGER NOT NULL,
    state TEXT NOT NULL,
    world_size INTEGER NOT NULL, num_classes INTEGER NOT NULL, score_kind TEXT NOT NULL,
    dataset_size INTEGER NOT NULL,
    created_at REAL NOT NULL, finalized_at REAL,
    num_samples INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    records_available INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    UNIQUE (run, model, split, step)
);
CREATE TABLE IF NOT EXISTS shards (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL,
    next_sequence INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0, closed INTEGER NOT NULL DEFAULT 0,
    nll_sum REAL NOT NULL DEFAULT 0, correct INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (evaluation_id, rank)
);
CREATE TABLE IF NOT EXISTS chunks (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence INTEGER NOT NULL,
    samples INTEGER NOT NULL, records BLOB,
    PRIMARY KEY (evaluation_id, rank, sequence)
);
CREATE TABLE IF NOT EXISTS rejections (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence INTEGER NOT NULL,
    code TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (evaluation_id, rank, sequence)
);
"""

EVAL_COLUMNS = (
    "e.id, e.run, e.model, e.split, e.step, e.state, e.world_size, e.num_classes, e.score_kind, "
    "e.dataset_size, e.created_at, e.finalized_at, e.num_samples, e.pinned, e.records_available, e.result, "
    "(SELECT COUNT(*) FROM shards s WHERE s.evaluation_id = e.id AND s.closed = 1) AS ranks_closed"
)
SHARD_COLUMNS = (
    "evaluation_id, rank, next_sequence, samples, chunks, rejected, closed, nll_sum, correct, updated_at"
)


def _evaluation(row: sqlite3.Row) -> EvaluationRow:
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
        result=row["result"],
    )


def _shard(row: sqlite3.Row) -> ShardRow:
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


def _connect(path: Path, synchronous: str, writer: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    if writer:  # before journal_mode, which writes the header of a new database
        _enable_incremental_vacuum(conn)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class _Writer:
    """One thread applying queued writes, many per transaction (group commit)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._loop, name="evalstream-store-writer", daemon=True)
        self._closed = False
        self._checkpoint_wanted = False
        self._thread.start()

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return self.post(op).result()

    def post(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue a write without waiting for it (the caller may wait on the future)."""
        if self._closed:
            raise RuntimeError("store is closed")
        fut: Future[T] = Future()
        self._queue.put((op, fut))
        return fut

    def checkpoint_when_idle(self) -> None:
        """Truncate the WAL after the current batch, once no write is waiting (called on the writer)."""
        self._checkpoint_wanted = True

    def close(self) -> None:
        """Apply every queued write, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if self._checkpoint_wanted and self._queue.empty():
                self._checkpoint_wanted = False
                self._checkpoint()
        self._conn.close()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and cut it to zero bytes, which is also when a reclaim's
        shrinking of the database file takes effect. Waits only briefly for readers: a busy
        checkpoint is retried after the next reclaim, and the size limit bounds the WAL meanwhile."""
        conn = self._conn
        try:
            conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
            busy, wal_pages, moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                log.info("WAL checkpoint stopped by readers (%d of %d pages copied)", moved, wal_pages)
        except sqlite3.Error:
            log.exception("WAL checkpoint failed")
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _run(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]]) -> None:
        conn = self._conn
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # the transaction itself failed: nothing in it committed
            log.exception("store transaction failed")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class SqliteStore(Store):
    """Store in ``<data_dir>/evalstream.db`` plus ``<data_dir>/records/``."""

    def __init__(self, data_dir: str | os.PathLike[str], synchronous: str = "normal") -> None:
        self.data_dir = Path(data_dir)
        self.records_dir = self.data_dir / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "evalstream.db"
        self._synchronous = synchronous
        conn = _connect(self.path, synchronous, writer=True)
        self.reclaims_space = _reclaims_space(conn, self.path)
        conn.executescript(SCHEMA)
        self._writer = _Writer(conn)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._reclaiming = False
        self._reclaim_lock = threading.Lock()
        self._reclaim_done = threading.Event()
        self._reclaim_done.set()
        self.reclaim()  # pages a crash left free mid-reclaim

    # -- giving disk space back ---------------------------------------------------------------------

    def reclaim(self) -> None:
        """Start giving free pages back to the file system without waiting for it.

        Each step is a queued write that frees at most ``VACUUM_STEP_PAGES``
        pages and queues the next step behind whatever arrived meanwhile, so a
        finalize that freed a million samples' chunks holds the writer for one
        step at a time, never for the whole reclaim. A database without
        incremental auto-vacuum only gets its WAL truncated.
        """
        with self._reclaim_lock:
            if self._reclaiming:
                return
            self._reclaiming = True
            self._reclaim_done.clear()
        self._post_step()

    def wait_reclaimed(self, timeout: float | None = None) -> bool:
        """Block until the reclaim in progress (if any) has freed every page; True if it did."""
        return self._reclaim_done.wait(timeout)

    def _post_step(self) -> None:
        try:
            fut = self._writer.post(self._vacuum_step)
        except RuntimeError:  # closing: the next start resumes from the free list
            self._end_reclaim()
            return
        fut.add_done_callback(self._after_step)

    def _vacuum_step(self, conn: sqlite3.Connection) -> int:
        """Free one bounded step of pages; returns how many free pages remain."""
        if not self.reclaims_space:
            return 0
        conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})").fetchall()  # one page per row
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0])

    def _after_step(self, fut: Future[int]) -> None:
        """Runs on the writer thread as the step's transaction commits."""
        if fut.exception() is None and fut.result() > 0:
            self._post_step()
            return
        if fut.exception() is not None:
            log.warning("reclaiming free pages failed: %s", fut.exception())
        self._writer.checkpoint_when_idle()
        self._end_reclaim()

    def _end_reclaim(self) -> None:
        with self._reclaim_lock:
            self._reclaiming = False
            self._reclaim_done.set()

    # -- plumbing -----------------------------------------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self._synchronous)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _records_path(self, evaluation_id: str) -> Path:
        return self.records_dir / f"{evaluation_id}.evrec"

    @staticmethod
    def _eval_in(conn: sqlite3.Connection, evaluation_id: str) -> EvaluationRow:
        row = conn.execute(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.id = ?", (evaluation_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no evaluation with id {evaluation_id!r}")
        return _evaluation(row)

    @staticmethod
    def _shard_in(conn: sqlite3.Connection, evaluation_id: str, rank: int) -> ShardRow:
        row = conn.execute(
            f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = ? AND rank = ?", (evaluation_id, rank)
        ).fetchone()
        if row is None:
            raise NotFound(f"evaluation {evaluation_id!r} has no shard for rank {rank}; open it first")
        return _shard(row)

    # -- writes -------------------------------------------------------------------------------------

    def open_shard(self, request: ShardOpenRequest) -> tuple[EvaluationRow, ShardRow]:
        def op(conn: sqlite3.Connection) -> tuple[EvaluationRow, ShardRow]:
            k = request.key
            row = conn.execute(
                "SELECT id FROM evaluations WHERE run = ? AND model = ? AND split = ? AND step = ?",
                (k.run, k.model, k.split, k.step),
            ).fetchone()
            now = time.time()
            if row is None:
                evaluation_id = uuid.uuid4().hex
                conn.execute(
                    "INSERT INTO evaluations (id, run, model, split, step, state, world_size, num_classes, "
                    "score_kind, dataset_size, created_at, pinned) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        evaluation_id,
                        k.run,
                        k.model,
                        k.split,
                        k.step,
                        OPEN,
                        request.world_size,
                        request.num_classes,
                        request.score_kind,
                        request.dataset_size,
                        now,
                        int(request.pin),
                    ),
                )
            else:
                evaluation_id = row["id"]
                ev = self._eval_in(conn, evaluation_id)
                _check_agrees(ev, request)
                if request.pin and not ev.pinned:
                    conn.execute("UPDATE evaluations SET pinned = 1 WHERE id = ?", (evaluation_id,))
            conn.execute(
                "INSERT OR IGNORE INTO shards (evaluation_id, rank, updated_at) VALUES (?, ?, ?)",
                (evaluation_id, request.rank, now),
            )
            return self._eval_in(conn, evaluation_id), self._shard_in(conn, evaluation_id, request.rank)

        return self._writer.submit(op)

    def commit_chunk(
        self,
        evaluation_id: str,
        rank: int,
        sequence: int,
        samples: int,
        records: bytes | None,
        nll_sum: float,
        correct: int,
        max_samples: int,
    ) -> ShardRow:
        def op(conn: sqlite3.Connection) -> ShardRow:
            ev = self._eval_in(conn, evaluation_id)
            shard = self._shard_in(conn, evaluation_id, rank)
            _check_writable(ev, shard)
            if sequence != shard.next_sequence:
                raise SequenceConflict(shard.next_sequence, sequence)
            if ev.num_samples + samples > max_samples:
                raise ResourceExhausted(_too_large(ev, ev.num_samples + samples, max_samples))
            conn.execute(
                "INSERT INTO chunks (evaluation_id, rank, sequence, samples, records) VALUES (?, ?, ?, ?, ?)",
                (evaluation_id, rank, sequence, samples, records),
            )
            conn.execute(
                "UPDATE shards SET next_sequence = ?, samples = samples + ?, chunks = chunks + 1, "
                "nll_sum = nll_sum + ?, correct = correct + ?, updated_at = ? "
                "WHERE evaluation_id = ? AND rank = ?",
                (sequence + 1, samples, nll_sum, correct, time.time(), evaluation_id, rank),
            )
            conn.execute(
                "UPDATE evaluations SET num_samples = num_samples + ? WHERE id = ?", (samples, evaluation_id)
            )
            return self._shard_in(conn, evaluation_id, rank)

        return self._writer.submit(op)

    def commit_chunks(
        self, evaluation_id: str, rank: int, chunks: Sequence[ChunkCommit], max_samples: int
    ) -> list[StoredChunk | SequenceConflict]:
        """A staging block's chunks in one transaction: the shard and evaluation rows are read once,
        every chunk's sequence is checked in order, the chunk and rejection rows are inserted with
        ``executemany`` and the two counters are written once, so a block costs the writer one
        statement batch instead of ~5 statements and a savepoint per ~87-row chunk."""

        def op(conn: sqlite3.Connection) -> list[StoredChunk | SequenceConflict]:
            ev = self._eval_in(conn, evaluation_id)
            shard = self._shard_in(conn, evaluation_id, rank)
            _check_writable(ev, shard)
            now = time.time()
            total = ev.num_samples
            out: list[StoredChunk | SequenceConflict] = []
            rows: list[tuple[str, int, int, int, bytes | None]] = []
            refused: list[tuple[str, int, int, str, str, str]] = []
            for chunk in chunks:
                if chunk.sequence != shard.next_sequence:
                    out.append(SequenceConflict(shard.next_sequence, chunk.sequence))
                    break
                rejection = chunk.rejection
                if rejection is None and total + chunk.samples > max_samples:
                    message = _too_large(ev, total + chunk.samples, max_samples)
                    rejection = Rejection(chunk.sequence, *TOO_LARGE, message)
                if rejection is None:
                    rows.append((evaluation_id, rank, chunk.sequence, chunk.samples, chunk.records))
                    total += chunk.samples
                    shard = dataclasses.replace(
                        shard,
                        next_sequence=chunk.sequence + 1,
                        samples=shard.samples + chunk.samples,
                        chunks=shard.chunks + 1,
                        nll_sum=shard.nll_sum + chunk.nll_sum,
                        correct=shard.correct + chunk.correct,
                        updated_at=now,
                    )
                else:
                    r = rejection
                    refused.append((evaluation_id, rank, r.sequence, r.code, r.reason, r.message))
                    shard = dataclasses.replace(
                        shard,
                        next_sequence=chunk.sequence + 1,
                        rejected_chunks=shard.rejected_chunks + 1,
                        updated_at=now,
                    )
                out.append(StoredChunk(shard, rejection))
            if rows:
                conn.executemany(
                    "INSERT INTO chunks (evaluation_id, rank, sequence, samples, records) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("UPDATE evaluations SET num_samples = ? WHERE id = ?", (total, evaluation_id))
            if refused:
                conn.executemany(
                    "INSERT INTO rejections (evaluation_id, rank, sequence, code, reason, message) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    refused,
                )
            if rows or refused:
                conn.execute(
                    "UPDATE shards SET next_sequence = ?, samples = ?, chunks = ?, rejected = ?, "
                    "nll_sum = ?, correct = ?, updated_at = ? WHERE evaluation_id = ? AND rank = ?",
                    (
                        shard.next_sequence,
                        shard.samples,
                        shard.chunks,
                        shard.rejected_chunks,
                        shard.nll_sum,
                        shard.correct,
                        shard.updated_at,
                        evaluation_id,
                        rank,
                    ),
                )
            return out

        return self._writer.submit(op)

    def reject_chunk(self, evaluation_id: str, rank: int, rejection: Rejection) -> ShardRow:
        def op(conn: sqlite3.Connection) -> ShardRow:
            ev = self._eval_in(conn, evaluation_id)
            shard = self._shard_in(conn, evaluation_id, rank)
            _check_writable(ev, shard)
            if rejection.sequence != shard.next_sequence:
                raise SequenceConflict(shard.next_sequence, rejection.sequence)
            conn.execute(
                "INSERT INTO rejections (evaluation_id, rank, sequence, code, reason, message) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    evaluation_id,
                    rank,
                    rejection.sequence,
                    rejection.code,
                    rejection.reason,
                    rejection.message,
                ),
            )
            conn.execute(
                "UPDATE shards SET next_sequence = ?, rejected = rejected + 1, updated_at = ? "
                "WHERE evaluation_id = ? AND rank = ?",
                (rejection.sequence + 1, time.time(), evaluation_id, rank),
            )
            return self._shard_in(conn, evaluation_id, rank)

        return self._writer.submit(op)

    def close_shard(self, evaluation_id: str, rank: int) -> EvaluationRow:
        def op(conn: sqlite3.Connection) -> EvaluationRow:
            self._shard_in(conn, evaluation_id, rank)
            conn.execute(
                "UPDATE shards SET closed = 1, updated_at = ? WHERE evaluation_id = ? AND rank = ?",
                (time.time(), evaluation_id, rank),
            )
            return self._eval_in(conn, evaluation_id)

        return self._writer.submit(op)

    def finalize(
        self, evaluation_id: str, result: bytes, records: bytes, num_samples: int, keep_latest: int
    ) -> EvaluationRow:
        path = self._records_path(evaluation_id)
        _write_atomic(path, records)

        def op(conn: sqlite3.Connection) -> tuple[EvaluationRow, list[str]]:
            ev = self._eval_in(conn, evaluation_id)
            if ev.finalized:  # finalized before (a racing FinalizeEvaluation): keep what is stored
                return ev, []
            conn.execute(
                "UPDATE evaluations SET state = ?, finalized_at = ?, result = ?, num_samples = ?, "
                "records_available = 1 WHERE id = ?",
                (FINALIZED, time.time(), result, num_samples, evaluation_id),
            )
            conn.execute("DELETE FROM chunks WHERE evaluation_id = ?", (evaluation_id,))
            dropped = self._retention_in(conn, ev.key, keep_latest)
            return self._eval_in(conn, evaluation_id), dropped

        row, dropped = self._writer.submit(op)
        self._unlink(dropped)
        self.reclaim()
        return row

    def set_pinned(self, evaluation_id: str, pinned: bool, keep_latest: int) -> EvaluationRow:
        def op(conn: sqlite3.Connection) -> tuple[EvaluationRow, list[str]]:
            ev = self._eval_in(conn, evaluation_id)
            conn.execute("UPDATE evaluations SET pinned = ? WHERE id = ?", (int(pinned), evaluation_id))
            dropped = self._retention_in(conn, ev.key, keep_latest)
            return self._eval_in(conn, evaluation_id), dropped

        row, dropped = self._writer.submit(op)
        self._unlink(dropped)
        return row

    def apply_retention(self, keep_latest: int) -> list[str]:
        """Drop records of evaluations past retention in every series; returns their ids."""

        def op(conn: sqlite3.Connection) -> list[str]:
            series = conn.execute(
                "SELECT DISTINCT run, model, split FROM evaluations WHERE state = ?", (FINALIZED,)
            )
            dropped: list[str] = []
            for s in series.fetchall():
                dropped += self._retention_in(
                    conn, EvaluationKey(s["run"], s["model"], s["split"], 0), keep_latest
                )
            return dropped

        dropped = self._writer.submit(op)
        self._unlink(dropped)
        return dropped

    def _retention_in(self, conn: sqlite3.Connection, key: EvaluationKey, keep_latest: int) -> list[str]:
        """Mark records unavailable beyond the latest ``keep_latest`` finalized steps of the series.

        Files are removed after the transaction commits, so a crash leaves at
        worst an orphan file, never a row pointing at a missing file.
        """
        if keep_latest <= 0:
            return []
        rows = conn.execute(
            "SELECT id FROM evaluations WHERE run = ? AND model = ? AND split = ? AND state = ? "
            "AND records_available = 1 AND pinned = 0 AND id NOT IN (SELECT id FROM evaluations "
            "WHERE run = ? AND model = ? AND split = ? AND state = ? ORDER BY step DESC, seq DESC LIMIT ?)",
            (key.run, key.model, key.split, FINALIZED) * 2 + (keep_latest,),
        ).fetchall()
        ids = [r["id"] for r in rows]
        conn.executemany("UPDATE evaluations SET records_available = 0 WHERE id = ?", [(i,) for i in ids])
        return ids

    def _unlink(self, evaluation_ids: Iterable[str]) -> None:
        for evaluation_id in evaluation_ids:
            with contextlib.suppress(FileNotFoundError):
                self._records_path(evaluation_id).unlink()

    # -- reads --------------------------------------------------------------------------------------

    def rejection(self, evaluation_id: str, rank: int, sequence: int) -> Rejection | None:
        row = (
            self._read()
            .execute(
                "SELECT sequence, code, reason, message FROM rejections "
                "WHERE evaluation_id = ? AND rank = ? AND sequence = ?",
                (evaluation_id, rank, sequence),
            )
            .fetchone()
        )
        return None if row is None else Rejection(row["sequence"], row["code"], row["reason"], row["message"])

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
        return None if found is None else _evaluation(found)

    def find(self, run: str, model: str, split: str, step: int | None) -> EvaluationRow | None:
        where = "e.run = ? AND e.model = ? AND e.split = ?"
        args: tuple[Any, ...] = (run, model, split)
        if step is None:
            sql = (
                f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE {where} "
                "ORDER BY e.step DESC, e.seq DESC LIMIT 1"
            )
        else:
            sql = f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE {where} AND e.step = ?"
            args += (step,)
        found = self._read().execute(sql, args).fetchone()
        return None if found is None else _evaluation(found)

    def list_evaluations(
        self, run: str = "", model: str = "", split: str = "", limit: int = 50, before: int | None = None
    ) -> tuple[list[EvaluationRow], int | None]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, value in (("run", run), ("model", model), ("split", split)):
            if value:
                clauses.append(f"e.{column} = ?")
                args.append(value)
        if before is not None:
            clauses.append("e.seq < ?")
            args.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = (
            self._read()
            .execute(
                f"SELECT e.seq AS seq, {EVAL_COLUMNS} FROM evaluations e {where} ORDER BY e.seq DESC LIMIT ?",
                (*args, limit + 1),
            )
            .fetchall()
        )
        page = rows[:limit]
        cursor = page[-1]["seq"] if len(rows) > limit else None
        return [_evaluation(r) for r in page], cursor

    def latest_per_model(self, run: str, split: str) -> list[EvaluationRow]:
        rows = self._read().execute(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.run = ? AND e.split = ? AND e.state = ? "
            "AND e.step = (SELECT MAX(step) FROM evaluations x WHERE x.run = e.run AND x.model = e.model "
            "AND x.split = e.split AND x.state = ?) ORDER BY e.model",
            (run, split, FINALIZED, FINALIZED),
        )
        return [_evaluation(r) for r in rows]

    def shards(self, evaluation_id: str) -> list[ShardRow]:
        rows = self._read().execute(
            f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id = ? ORDER BY rank", (evaluation_id,)
        )
        return [_shard(r) for r in rows]

    def open_shards(self) -> list[tuple[EvaluationRow, ShardRow]]:
        conn = self._read()
        evals = {
            r["id"]: _evaluation(r)
            for r in conn.execute(f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = ?", (OPEN,))
        }
        if not evals:
            return []
        rows = conn.execute(
            f"SELECT {SHARD_COLUMNS} FROM shards WHERE evaluation_id IN "
            "(SELECT id FROM evaluations WHERE state = ?) ORDER BY evaluation_id, rank",
            (OPEN,),
        )
        return [(evals[r["evaluation_id"]], _shard(r)) for r in rows if r["evaluation_id"] in evals]

    def final_records(self, evaluation_id: str) -> bytes | None:
        ev = self.get(evaluation_id)
        if ev is None or not ev.finalized or not ev.records_available:
            return None
        try:
            return self._records_path(evaluation_id).read_bytes()
        except FileNotFoundError:
            return None

    def pending_finalize(self) -> list[EvaluationRow]:
        rows = self._read().execute(f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = ?", (OPEN,))
        return [ev for ev in map(_evaluation, rows) if ev.ranks_closed >= ev.world_size]

    def latest_finalized(self) -> list[FinalizedView]:
        rows = self._read().execute(
            f"SELECT {EVAL_COLUMNS} FROM evaluations e WHERE e.state = ? AND e.step = (SELECT MAX(step) "
            "FROM evaluations x WHERE x.run = e.run AND x.model = e.model AND x.split = e.split "
            "AND x.state = ?) "
            "ORDER BY e.finalized_at DESC",
            (FINALIZED, FINALIZED),
        )
        views = []
        for r in rows:
            ev = _evaluation(r)
            result = evaluation_pb2.EvaluationResult()
            result.ParseFromString(ev.result or b"")
            result.imbalance.ClearField("per_class")
            views.append(
                FinalizedView(
                    key=SeriesKey(ev.key.run, ev.key.model, ev.key.split),
                    step=ev.key.step,
                    finalized_at=ev.finalized_at or 0.0,
                    result=result,
                )
            )
        return views

    def close(self) -> None:
        self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._readers.clear()


def _enable_incremental_vacuum(conn: sqlite3.Connection) -> None:
    """Ask for incremental auto-vacuum on a database that has no table yet: SQLite only accepts it
    before the first table exists (on an older database the pragma changes nothing)."""
    if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")


def _reclaims_space(conn: sqlite3.Connection, path: Path) -> bool:
    """Whether the database can give free pages back. An older database keeps working without
    it: its free pages are reused by later chunks but never given back, which the log line says."""
    mode = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    if mode != INCREMENTAL:
        log.warning(
            "%s was created without incremental auto-vacuum: pages freed by finalized chunks are reused "
            "but not returned to the file system (an offline `PRAGMA auto_vacuum=INCREMENTAL; VACUUM;` "
            "with the server stopped converts it)",
            path,
        )
    return mode == INCREMENTAL


def _check_agrees(ev: EvaluationRow, request: ShardOpenRequest) -> None:
    """The shard must describe the same evaluation every other rank opened."""
    name = f"{ev.key.run}/{ev.key.model}/{ev.key.split}@{ev.key.step}"
    if ev.world_size != request.world_size:
        raise FailedPrecondition(
            f"evaluation {name} was opened with world_size={ev.world_size}, this shard says "
            f"{request.world_size}; every rank must send the same world size"
        )
    if ev.num_classes != request.num_classes:
        raise FailedPrecondition(
            f"evaluation {name} was opened with num_classes={ev.num_classes}, this shard says "
            f"{request.num_classes}; every rank must send the same class count"
        )
    if ev.score_kind != request.score_kind:
        raise FailedPrecondition(
            f"evaluation {name} was opened with score kind {ev.score_kind}, "
            f"this shard says {request.score_kind}"
        )


def _too_large(ev: EvaluationRow, total: int, max_samples: int) -> str:
    return (
        f"evaluation {ev.key.run}/{ev.key.model}/{ev.key.split}@{ev.key.step} would hold {total} samples, "
        f"over the server's max_samples_per_evaluation={max_samples}"
    )


def _check_writable(ev: EvaluationRow, shard: ShardRow) -> None:
    if ev.finalized:
        raise FailedPrecondition(
            f"evaluation {ev.evaluation_id} is finalized; no more chunks are accepted (use a new step)"
        )
    if shard.closed:
        raise FailedPrecondition(f"rank {shard.rank} of evaluation {ev.evaluation_id} is closed")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
