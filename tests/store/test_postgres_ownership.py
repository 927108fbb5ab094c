"""A rank's hold in the shared database (``postgres_ownership.py``), replica against replica.

Each "replica" is its own ``PostgresStore`` on one database, as in separate server processes; a
replica that died or stalled is one whose heartbeat was stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from evalstream.service.store import EvaluationKey, ShardOpenRequest
from evalstream.service.store.postgres import PostgresStore
from evalstream.service.store.postgres_schema import LATEST, migrate

LEASE_S = 0.6


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[list[PostgresStore]]:
    stores = [PostgresStore(postgres_url, pool_size=2, shard_lease_s=LEASE_S) for _ in range(2)]
    yield stores
    for s in stores:
        s.close()


def _open(store: PostgresStore) -> str:
    ev, _ = store.open_shard(
        ShardOpenRequest(EvaluationKey("r", "m", "validation", 0), 0, 1, 10, "logits", 0, False)
    )
    return ev.evaluation_id


def _holders(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT replica, token FROM shard_owners").fetchall()]


def test_a_held_rank_is_refused_to_another_replica_until_released(
    replicas: list[PostgresStore], postgres_url: str
) -> None:
    a, b = replicas
    evaluation_id = _open(a)
    assert a.acquire_shard(evaluation_id, 0, "stream-a") is not None
    time.sleep(2 * LEASE_S)  # a live replica's heartbeat keeps the hold past its expiry
    assert b.acquire_shard(evaluation_id, 0, "stream-b") is None
    assert _holders(postgres_url) == [(a.ownership.replica, "stream-a")]
    a.release_shard(evaluation_id, 0, "stream-a")
    shard = b.acquire_shard(evaluation_id, 0, "stream-b")
    assert shard is not None and shard.rank == 0 and shard.next_sequence == 0
    assert not b.shard_lost("stream-b")


def test_a_stalled_replicas_hold_is_taken_over_after_it_expires_and_it_learns_it_lost_it(
    replicas: list[PostgresStore], postgres_url: str
) -> None:
    a, b = replicas
    evaluation_id = _open(a)
    assert a.acquire_shard(evaluation_id, 0, "stream-a") is not None
    a.ownership.stop()  # replica a stalls: nothing renews its hold
    assert b.acquire_shard(evaluation_id, 0, "stream-b") is None
    time.sleep(LEASE_S + 0.2)
    assert b.acquire_shard(evaluation_id, 0, "stream-b") is not None
    assert not a.shard_lost("stream-a")
    a._run(a.ownership.renew_in)  # a wakes up: its next renewal finds the hold gone
    assert a.shard_lost("stream-a")
    assert _holders(postgres_url) == [(b.ownership.replica, "stream-b")]


def test_a_replica_takes_its_own_ended_streams_hold_and_cleans_up_holds_nobody_holds(
    replicas: list[PostgresStore], postgres_url: str
) -> None:
    a, _ = replicas
    evaluation_id = _open(a)
    assert a.acquire_shard(evaluation_id, 0, "first") is not None
    # The first stream ended on this replica but its release has not landed: a new stream of the
    # same replica (which its lease table let in) takes the hold over, and the late release of the
    # first one leaves it alone.
    assert a.acquire_shard(evaluation_id, 0, "second") is not None
    a.release_shard(evaluation_id, 0, "first")
    assert _holders(postgres_url) == [(a.ownership.replica, "second")]
    # A hold whose release never landed (the database was away) is deleted by the next heartbeat.
    with a._conn() as conn, conn.transaction():
        a.ownership.release_in(conn, evaluation_id, 0, "second")
        raise psycopg.Rollback()  # the release's transaction never committed
    assert _holders(postgres_url) == [(a.ownership.replica, "second")]
    a._run(a.ownership.renew_in)
    assert _holders(postgres_url) == []


def test_a_stopping_replica_releases_every_hold(postgres_url: str) -> None:
    a = PostgresStore(postgres_url, pool_size=2, shard_lease_s=60.0)
    b = PostgresStore(postgres_url, pool_size=2, shard_lease_s=60.0)
    try:
        evaluation_id = _open(a)
        assert a.acquire_shard(evaluation_id, 0, "stream-a") is not None
        a.close()
        assert b.acquire_shard(evaluation_id, 0, "stream-b") is not None
    finally:
        b.close()


def test_a_version_1_database_is_upgraded_with_its_open_evaluation(postgres_url: str) -> None:
    """Version 2 adds the holds table and the refused chunks' digests; what version 1 holds stays."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        migrate(conn, 1)
    with psycopg.connect(postgres_url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO evaluations (id, run, model, split, step, state, world_size, num_classes, "
            "score_kind, dataset_size, created_at) VALUES ('e1', 'r', 'm', 'validation', 0, 'open', 1, "
            "10, 'logits', 0, 0)"
        )
        conn.execute(
            "INSERT INTO shards (evaluation_id, rank, next_sequence, updated_at) VALUES ('e1', 0, 1, 0)"
        )
        conn.execute(
            "INSERT INTO chunks (evaluation_id, rank, sequence, samples, records) VALUES ('e1', 0, 0, 3, 'x')"
        )
    store = PostgresStore(postgres_url, pool_size=2)
    try:
        assert store.chunk_digest("e1", 0, 0) is None  # committed before digests: judges nothing
        shard = store.acquire_shard("e1", 0, "stream")
        assert shard is not None and shard.next_sequence == 1
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute("SELECT version FROM evalstream_schema").fetchall() == [(LATEST,)]
    finally:
        store.close()


def test_holds_of_replicas_dead_for_an_hour_are_forgotten(
    replicas: list[PostgresStore], postgres_url: str
) -> None:
    a, _ = replicas
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for rank, ago in ((0, "2 hours"), (1, "1 minute")):
            conn.execute(
                "INSERT INTO shard_owners (evaluation_id, rank, replica, token, expires) "
                f"VALUES ('e', %s, 'gone', 't', clock_timestamp() - interval '{ago}')",
                (rank,),
            )
    a._run(a.ownership.renew_in)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT rank FROM shard_owners").fetchall() == [(1,)]
