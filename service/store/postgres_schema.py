"""The PostgreSQL store's schema: its versions, migrations run once under an advisory lock.

Why a lock: several replicas start together against one database, and each
would otherwise run the same ``CREATE TABLE`` / ``ALTER`` at once. Every
replica takes one transaction-scoped advisory lock before it reads the
version, so the first applies the migrations and the others, once it commits,
find the schema current and change nothing. The version lives in a one-row
table written in the same transaction as the migration, so a crash mid-upgrade
leaves the database at the last whole version. A database whose version is
newer than this server knows is refused (``SchemaTooNew``): an older replica
must not write into a layout it does not understand.

The layout, and why:

- ``evaluations.closed`` counts closed ranks on the evaluation row itself, so
  the close that brings it to ``world_size`` is the one whose update returns
  that number: concurrent last closes on two replicas serialize on the row
  lock and exactly one of them sees the count complete (counting closed shard
  rows instead lets two closers each see N-1 in their own snapshot).
- ``chunks`` has the primary key (evaluation, rank, sequence): a chunk is
  inserted if absent in the transaction that advances the shard, so a
  sequence is committed at most once whichever replica receives it; its
  ``digest`` is the hash of the received input, kept to judge a re-sent
  sequence.
- ``claim_*`` columns are a finalizer's lease: owner, an epoch bumped by every
  claim, and an expiry on the database clock (one clock for every replica).
- ``final_records`` holds an evaluation's merged records as ``bytea`` pieces,
  each far below PostgreSQL's 1 GB value limit.
- ``shard_owners`` holds which live stream (replica, token) owns a rank, with an
  expiry on the database clock: a second stream for the rank on any replica is
  refused while it lives (``postgres_ownership.py``).
"""

from __future__ import annotations

import logging

import psycopg

from evalstream.service.store.errors import SchemaTooNew

log = logging.getLogger(__name__)

# Any constant works as long as every replica uses the same one: "evalstre" in ASCII.
MIGRATION_LOCK = 0x6576616C73747265

V1 = (
    """CREATE TABLE evaluations (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    run TEXT NOT NULL, model TEXT NOT NULL, split TEXT NOT NULL, step BIGINT NOT NULL,
    state TEXT NOT NULL,
    world_size INTEGER NOT NULL, num_classes INTEGER NOT NULL, score_kind TEXT NOT NULL,
    dataset_size BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, finalized_at DOUBLE PRECISION,
    num_samples BIGINT NOT NULL DEFAULT 0,
    closed INTEGER NOT NULL DEFAULT 0,
    pinned BOOLEAN NOT NULL DEFAULT false,
    records_available BOOLEAN NOT NULL DEFAULT false,
    result BYTEA,
    claim_owner TEXT, claim_epoch BIGINT NOT NULL DEFAULT 0, claim_expires TIMESTAMPTZ,
    UNIQUE (run, model, split, step)
)""",
    "CREATE INDEX evaluations_open ON evaluations (state) WHERE state = 'open'",
    """CREATE TABLE shards (
    evaluation_id TEXT NOT NULL REFERENCES evaluations (id) ON DELETE CASCADE,
    rank INTEGER NOT NULL,
    next_sequence BIGINT NOT NULL DEFAULT 0,
    samples BIGINT NOT NULL DEFAULT 0, chunks BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0, closed BOOLEAN NOT NULL DEFAULT false,
    nll_sum DOUBLE PRECISION NOT NULL DEFAULT 0, correct BIGINT NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (evaluation_id, rank)
)""",
    """CREATE TABLE chunks (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence BIGINT NOT NULL,
    samples BIGINT NOT NULL, digest BYTEA, records BYTEA,
    PRIMARY KEY (evaluation_id, rank, sequence)
)""",
    """CREATE TABLE rejections (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL, sequence BIGINT NOT NULL,
    reason TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (evaluation_id, rank, sequence)
)""",
    """CREATE TABLE final_records (
    evaluation_id TEXT NOT NULL, piece INTEGER NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (evaluation_id, piece)
)""",
)

# Version 2: a refused chunk keeps its input's digest too (a chunk's was in V1), and a live stream's
# hold on its rank is a row of ``shard_owners`` (``postgres_ownership.py``): its own table, so the
# heartbeat that renews a replica's holds never waits on the shard rows commits lock.
V2 = (
    "ALTER TABLE rejections ADD COLUMN digest BYTEA",
    """CREATE TABLE shard_owners (
    evaluation_id TEXT NOT NULL, rank INTEGER NOT NULL,
    replica TEXT NOT NULL, token TEXT NOT NULL, expires TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (evaluation_id, rank)
)""",
    "CREATE INDEX shard_owners_replica ON shard_owners (replica)",
)

# Applied in order: MIGRATIONS[i] takes a database from version i to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (V1, V2)
LATEST = len(MIGRATIONS)


def schema_version(conn: psycopg.Connection) -> int:
    """The version a database is at; 0 for an empty one."""
    exists = conn.execute("SELECT to_regclass('evalstream_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT version FROM evalstream_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection, latest: int = LATEST) -> int:
    """Bring the database up to ``latest`` under the migration lock; returns the version it was at.

    ``latest`` is a parameter only so a test can play an older server against a newer database.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = schema_version(conn)
        if found > latest:
            raise SchemaTooNew(found, latest)
        if found == 0:
            conn.execute("CREATE TABLE IF NOT EXISTS evalstream_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO evalstream_schema (version) VALUES (0)")
        for version in range(found, latest):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)  # type: ignore[arg-type]  # our own constant DDL
            conn.execute("UPDATE evalstream_schema SET version = %s", (version + 1,))
    if found not in (0, latest):
        log.info("store schema upgraded from version %d to %d", found, latest)
    return found
