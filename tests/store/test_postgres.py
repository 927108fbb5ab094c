"""What only a shared store must guarantee: replicas racing on one PostgreSQL database.

Each "replica" here is its own ``PostgresStore`` (its own pool of connections), as
in separate server processes; threads released by a barrier make the races
happen on purpose rather than by luck. The contract suite (tests/store/contract)
covers what every backend does alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import TypeVar

import psycopg
import pytest

from evalstream.service.store import (
    ChunkCommit,
    EvaluationKey,
    SchemaTooNew,
    SequenceConflict,
    ShardOpenRequest,
    StoredChunk,
    StorePolicy,
)
from evalstream.service.store import postgres as pg_module
from evalstream.service.store.postgres import PostgresStore
from evalstream.service.store.postgres_schema import LATEST
from tests.support.postgres import PostgresServer

T = TypeVar("T")
WORLD = 8


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[list[PostgresStore]]:
    stores = [PostgresStore(postgres_url, pool_size=WORLD) for _ in range(3)]
    yield stores
    for s in stores:
        s.close()


def race(calls: list[Callable[[], T]]) -> list[T]:
    """Run every call on its own thread, all released at once; their results in order."""
    barrier = threading.Barrier(len(calls))
    out: list[T | BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for item in out:
        if isinstance(item, BaseException):
            raise item
    return out  # type: ignore[return-value]


def open_all(stores: list[PostgresStore], step: int, world: int = WORLD) -> str:
    key = EvaluationKey("race", "m", "validation", step)
    ids = {
        stores[rank % len(stores)]
        .open_shard(ShardOpenRequest(key, rank, world, 10, "logits", 0, False))[0]
        .evaluation_id
        for rank in range(world)
    }
    assert len(ids) == 1
    return ids.pop()


def test_concurrent_last_closes_let_exactly_one_replica_see_all_ranks_closed(
    replicas: list[PostgresStore],
) -> None:
    for step in range(20):
        evaluation_id = open_all(replicas, step)
        closes = race([partial(replicas[rank % 3].close_shard, evaluation_id, rank) for rank in range(WORLD)])
        seen = sorted(row.ranks_closed for row in closes)
        assert seen == list(range(1, WORLD + 1)), seen  # every close counted once, one saw WORLD
        again = replicas[0].close_shard(evaluation_id, 3)  # a retried close counts nothing
        assert again.ranks_closed == WORLD
        assert [row.evaluation_id for row in replicas[1].pending_finalize()] == [evaluation_id]
        replicas[2].finalize(evaluation_id, b"r", b"x", 0)


def test_racing_finalizes_commit_exactly_one_result(replicas: list[PostgresStore]) -> None:
    for step in range(10):
        evaluation_id = open_all(replicas, step, world=1)
        won = race(
            [
                partial(
                    replicas[i % 3].finalize_claimed,
                    evaluation_id,
                    None,
                    f"result-{i}".encode(),
                    f"records-{i}".encode(),
                    i,
                )
                for i in range(6)
            ]
        )
        winners = [i for i, row in enumerate(won) if row is not None]
        assert len(winners) == 1
        row = replicas[0].get(evaluation_id)
        assert row is not None and row.finalized
        assert row.result == f"result-{winners[0]}".encode()
        assert replicas[1].final_records(evaluation_id) == f"records-{winners[0]}".encode()
        # The store-level finalize of a loser answers the stored row, unchanged.
        assert replicas[2].finalize(evaluation_id, b"late", b"late", 99).result == row.result


def test_one_sequence_sent_to_two_replicas_commits_once(replicas: list[PostgresStore]) -> None:
    evaluation_id = open_all(replicas, 0, world=1)
    for sequence in range(10):
        results = race(
            [
                partial(
                    replicas[i].commit_chunks,
                    evaluation_id,
                    0,
                    [ChunkCommit(sequence, 2, f"{sequence}-{i}".encode(), 1.0, 1)],
                )
                for i in range(3)
            ]
        )
        stored = [r[0] for r in results if isinstance(r[0], StoredChunk)]
        conflicts = [r[0] for r in results if isinstance(r[0], SequenceConflict)]
        assert len(stored) == 1 and len(conflicts) == 2
        assert all(c.expected == sequence + 1 for c in conflicts)
    shard = replicas[0].shards(evaluation_id)[0]
    assert (shard.next_sequence, shard.samples, shard.chunks) == (10, 20, 10)
    assert len(replicas[1].chunk_records(evaluation_id)) == 10


def test_merged_records_are_stored_in_pieces(
    replicas: list[PostgresStore], postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_module, "PIECE_BYTES", 1000)
    evaluation_id = open_all(replicas, 0, world=1)
    records = bytes(range(256)) * 20  # 5,120 bytes: six pieces
    replicas[0].finalize(evaluation_id, b"r", records, 1)
    with psycopg.connect(postgres_url) as conn:
        sizes = conn.execute(
            "SELECT length(data) FROM final_records WHERE evaluation_id = %s ORDER BY piece", (evaluation_id,)
        ).fetchall()
    assert [s[0] for s in sizes] == [1000] * 5 + [120]
    assert replicas[2].final_records(evaluation_id) == records


def test_retention_drops_pieces_with_the_rows(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, policy=StorePolicy(retention_keep_latest=1))
    try:
        ids = [open_all([store], step, world=1) for step in range(3)]
        for evaluation_id in ids:
            store.finalize(evaluation_id, b"r", b"records", 1)
        with psycopg.connect(postgres_url) as conn:
            kept = conn.execute("SELECT DISTINCT evaluation_id FROM final_records").fetchall()
        assert [k[0] for k in kept] == [ids[-1]]
        assert store.final_records(ids[0]) is None
    finally:
        store.close()


def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    stores = race([partial(PostgresStore, postgres_url, pool_size=1) for _ in range(4)])
    for s in stores:
        s.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM evalstream_schema").fetchall() == [(LATEST,)]


def test_an_older_server_refuses_a_newer_schema(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE evalstream_schema SET version = %s", (LATEST + 1,))
    with pytest.raises(SchemaTooNew) as info:
        PostgresStore(postgres_url)
    assert info.value.found == LATEST + 1 and info.value.supported == LATEST


def test_calls_wait_out_a_database_restart(postgres_server: PostgresServer, postgres_url: str) -> None:
    store = PostgresStore(postgres_url, pool_size=2)
    try:
        evaluation_id = open_all([store], 0, world=1)
        store.commit_chunks(evaluation_id, 0, [ChunkCommit(0, 1, b"a", 0.1, 1)])
        postgres_server.kill()  # connections in the pool are now dead
        restarted = threading.Timer(1.5, postgres_server.start)
        restarted.start()
        try:
            out = store.commit_chunks(evaluation_id, 0, [ChunkCommit(1, 1, b"b", 0.1, 1)])
        finally:
            restarted.join()
        assert isinstance(out[0], StoredChunk) and out[0].shard.next_sequence == 2
        assert store.chunk_records(evaluation_id) == [b"a", b"b"]
    finally:
        store.close()
