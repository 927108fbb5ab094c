"""The SQLite store's one writer thread: group commit, failures in the store's words, space reclaim.

Why one writer thread: SQLite allows one writer at a time anyway; funnelling
writes through one thread lets it commit every write that queued up while the
previous transaction was syncing in a single transaction (group commit), so
many concurrent streams cost one sync instead of one each. A caller's write
returns only after its transaction committed. Each write runs inside its own
savepoint, so a write that fails (a sequence conflict) never takes its batch
neighbours down with it.

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
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from evalstream.service.store.errors import StoreFull, StoreReadOnly, classify_os_error
from evalstream.service.store.sqlite_schema import BUSY_TIMEOUT_MS

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BATCH = 256
# Pages one reclaim step frees (2 MiB at the default 4 KiB page): ~10 ms of writer time on a 2-core box.
VACUUM_STEP_PAGES = 512
# How long a WAL-truncating checkpoint waits for readers before it gives up until the next reclaim.
CHECKPOINT_BUSY_MS = 200
# The background checkpointer copies the WAL into the database at most this often while writes come.
CHECKPOINT_INTERVAL_S = 0.05
# The writer's own automatic checkpoint (inside a COMMIT) only past this many WAL pages (64 MiB at
# 4 KiB pages): a backstop should the background checkpointer fall behind.
BACKSTOP_PAGES = 16384

_NO_SPACE = frozenset({"SQLITE_FULL"})
_UNWRITABLE_PREFIXES = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM")


def store_error(exc: BaseException) -> BaseException:
    """A failed write as the store's refusal (no space, cannot be written); anything else unchanged."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name in _NO_SPACE:
            return StoreFull(str(exc))
        if name.startswith(_UNWRITABLE_PREFIXES):
            return StoreReadOnly(f"{name}: {exc}")
        return exc
    return classify_os_error(exc) or exc


def raise_as_store_error(exc: BaseException) -> None:
    translated = store_error(exc)
    if translated is exc:
        raise exc
    raise translated from exc


class Checkpointer:
    """Copies the WAL into the database from its own thread and connection (PASSIVE checkpoints).

    Why: SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, on the
    writer thread: every ~4 MiB of chunks the writer stopped to copy the WAL into the database
    and sync both files (measured: ~40% of its time in records-mode ingest, and longer still in
    waits for the disk). A PASSIVE checkpoint on another connection runs beside the writer's
    commits (SQLite's WAL lets both proceed), so the writer only appends. The writer's own
    automatic checkpoint stays as a backstop at ``BACKSTOP_PAGES``, should this thread fall
    that far behind."""

    def __init__(self, path: str, synchronous: int) -> None:
        self._path, self._synchronous = path, synchronous
        self._wanted = threading.Event()
        # Held around every checkpoint of this store, this thread's and the writer's: SQLite runs one
        # checkpoint at a time and answers a second with "busy" at once (no busy wait), so without it
        # the writer's truncating checkpoint after a reclaim could be lost to a passive one here.
        self.lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="evalstream-store-checkpointer", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A transaction committed: checkpoint soon (at most every ``CHECKPOINT_INTERVAL_S``)."""
        self._wanted.set()

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")  # a checkpoint syncs as the writer would
            while True:
                self._wanted.wait()
                self._wanted.clear()  # close() sets _closed before the event: seen below either way
                if self._closed:
                    break
                time.sleep(CHECKPOINT_INTERVAL_S)  # let commits gather: one checkpoint (two syncs) for them
                try:
                    with self.lock:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    log.warning(
                        "background WAL checkpoint failed (the writer's own takes over)", exc_info=True
                    )
        finally:
            conn.close()


class Writer:
    """One thread applying queued writes, many per transaction (group commit)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        path = str(conn.execute("PRAGMA database_list").fetchone()[2])
        self._checkpointer: Checkpointer | None = None
        if path and str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self._checkpointer = Checkpointer(path, int(conn.execute("PRAGMA synchronous").fetchone()[0]))
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
            if self._checkpointer is not None:
                self._checkpointer.poke()
            if self._checkpoint_wanted and self._queue.empty():
                self._checkpoint_wanted = False
                self._checkpoint()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._conn.close()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and cut it to zero bytes, which is also when a reclaim's
        shrinking of the database file takes effect. Waits only briefly for readers: a busy
        checkpoint is retried after the next reclaim, and the size limit bounds the WAL meanwhile."""
        conn = self._conn
        sibling = self._checkpointer.lock if self._checkpointer is not None else contextlib.nullcontext()
        try:
            conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
            with sibling:
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
                fut.set_exception(store_error(exc))
            return
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(store_error(value))


class Reclaimer:
    """Gives a database's free pages back a bounded step at a time, queued behind other writes."""

    def __init__(self, writer: Writer, enabled: bool) -> None:
        self._writer = writer
        self.enabled = enabled
        self._reclaiming = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()

    def start(self) -> None:
        """Start giving free pages back to the file system without waiting for it.

        Each step is a queued write that frees at most ``VACUUM_STEP_PAGES``
        pages and queues the next step behind whatever arrived meanwhile, so a
        finalize that freed a million samples' chunks holds the writer for one
        step at a time, never for the whole reclaim. A database without
        incremental auto-vacuum only gets its WAL truncated.
        """
        with self._lock:
            if self._reclaiming:
                return
            self._reclaiming = True
            self._done.clear()
        self._post_step()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the reclaim in progress (if any) has freed every page; True if it did."""
        return self._done.wait(timeout)

    def _post_step(self) -> None:
        try:
            fut = self._writer.post(self._step)
        except RuntimeError:  # closing: the next start resumes from the free list
            self._end()
            return
        fut.add_done_callback(self._after_step)

    def _step(self, conn: sqlite3.Connection) -> int:
        """Free one bounded step of pages; returns how many free pages remain."""
        if not self.enabled:
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
        self._end()

    def _end(self) -> None:
        with self._lock:
            self._reclaiming = False
            self._done.set()
