"""The SQLite store's schema: its versions, the ordered migrations between them, and connections.

Why versions: a server upgrade must open the database the previous release
wrote, and a newer schema must not be half-read by an older server. The
version lives in ``PRAGMA user_version``; at start every migration above it is
applied in order, each in its own transaction together with the new version
number, so a crash mid-upgrade leaves the database at the last whole version.
A database from before versions existed reads as version 0 and already has
version 1's tables (``CREATE TABLE IF NOT EXISTS`` leaves them as they are).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from evalstream.service.store.errors import SchemaTooNew

log = logging.getLogger(__name__)

# The WAL is cut back to this size whenever a checkpoint restarts it, whatever a big transaction grew it to.
JOURNAL_SIZE_LIMIT = 16 * 2**20
BUSY_TIMEOUT_MS = 30_000
INCREMENTAL = 2  # PRAGMA auto_vacuum value

# Version 1: the first released schema (rejections kept a gRPC status name beside the reason).
V1 = (
    """CREATE TABLE IF NOT EXISTS evaluations (
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
)""",
    """CREATE TABLE IF NOT EXISTS shards (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL,
    next_sequence INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0, closed INTEGER NOT NULL DEFAULT 0,
    nll_sum REAL NOT NULL DEFAULT 0, correct INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (evaluation_id, rank)
)""",
    """CREATE TABLE IF NOT EXISTS chunks (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence INTEGER NOT NULL,
    samples INTEGER NOT NULL, records BLOB,
    PRIMARY KEY (evaluation_id, rank, sequence)
)""",
    """CREATE TABLE IF NOT EXISTS rejections (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence INTEGER NOT NULL,
    code TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (evaluation_id, rank, sequence)
)""",
)

# Version 2: a rejection is its domain reason and message; the status a client hears is derived
# from the reason when it is answered, so the stored row names no gRPC code.
V2 = (
    """CREATE TABLE rejections_v2 (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence INTEGER NOT NULL,
    reason TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (evaluation_id, rank, sequence)
)""",
    "INSERT INTO rejections_v2 (evaluation_id, rank, sequence, reason, message) "
    "SELECT evaluation_id, rank, sequence, reason, message FROM rejections",
    "DROP TABLE rejections",
    "ALTER TABLE rejections_v2 RENAME TO rejections",
)

# Version 3: every chunk (and refused chunk) keeps the digest of its received input, which judges a
# re-sent sequence: the same input is a duplicate, other input a conflict (service/digest.py).
# Rows from before have none and judge nothing.
V3 = (
    "ALTER TABLE chunks ADD COLUMN digest BLOB",
    "ALTER TABLE rejections ADD COLUMN digest BLOB",
)

# Applied in order: MIGRATIONS[i] takes a database from version i to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (V1, V2, V3)
LATEST = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the database up to ``LATEST``; returns the version it was at. Writes nothing when current."""
    found = schema_version(conn)
    if found > LATEST:
        raise SchemaTooNew(found, LATEST)
    for version in range(found, LATEST):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if found not in (0, LATEST):
        log.info("%s: schema upgraded from version %d to %d", path, found, LATEST)
    return found


def connect(path: Path, synchronous: str, writer: bool = False) -> sqlite3.Connection:
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


def _enable_incremental_vacuum(conn: sqlite3.Connection) -> None:
    """Ask for incremental auto-vacuum on a database that has no table yet: SQLite only accepts it
    before the first table exists (on an older database the pragma changes nothing)."""
    if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")


def reclaims_space(conn: sqlite3.Connection, path: Path) -> bool:
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
