"""Three stateless replicas on one PostgreSQL: any rank on any replica, every result exactly once.

Real processes (``python -m evalstream.service.server``) on loopback ports, a real
PostgreSQL (``tests/support/postgres.py``), the client library streaming each rank
from its own thread. Fault-test data carries no sample ids, so a chunk lost or counted
twice changes the sample count and every sum of the result, which is compared
exactly with the engine's reference on the data sent.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psycopg
import pytest

from evalstream.client import EvalClient, RetryPolicy
from evalstream.service.settings import Settings
from tests.faults.harness import ServerProcess
from tests.faults.workload import (
    PATIENT,
    RankRun,
    assert_same_result,
    fetch_result,
    rank_batches,
    reference,
    stream_rank,
)
from tests.replicas.cluster import Cluster, Finalizations
from tests.replicas.test_client_targets import chunks_committed
from tests.support.postgres import PostgresServer

CLASSES = 50
WORLD = 8


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_url)
    try:
        yield made
    finally:
        made.close()


def stream_ranks(
    targets: list[str], ranks: list[list[tuple[np.ndarray, np.ndarray]]], model: str, **kwargs: object
) -> list[RankRun]:
    """Rank r streams to ``targets[r]`` on its own thread; all started at once."""
    runs = [RankRun(rank) for rank in range(len(ranks))]
    for run, target, batches in zip(runs, targets, ranks, strict=True):
        run.thread = threading.Thread(
            target=stream_rank,
            args=(target, run),
            kwargs={
                "model": model,
                "world_size": len(ranks),
                "batches": batches,
                "num_classes": CLASSES,
                **kwargs,
            },
            daemon=True,
        )
        run.thread.start()
    return runs


def join(runs: list[RankRun], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    for run in runs:
        assert run.thread is not None
        run.thread.join(max(0.0, deadline - time.monotonic()))
        assert not run.thread.is_alive(), f"rank {run.rank} still streaming"
        assert run.error is None, f"rank {run.rank} failed: {run.error!r}"


def test_eight_ranks_over_three_replicas_equal_one_sqlite_server(
    cluster: Cluster, finalizations: Finalizations, tmp_path: Path
) -> None:
    sqlite = ServerProcess(tmp_path / "sqlite")
    try:
        sqlite.start(wait=False)
        cluster.start()
        sqlite.wait_ready()
        ranks = [rank_batches(r, 3, 200, CLASSES, seed=12) for r in range(WORLD)]
        join(stream_ranks([cluster.targets[r % 3] for r in range(WORLD)], ranks, "spread"))
        join(stream_ranks([sqlite.target] * WORLD, ranks, "spread"))
        single = fetch_result(sqlite.target, "spread").result
    finally:
        sqlite.close()
    want = reference(ranks, CLASSES, Settings.load(cluster.replicas[0].config, env={}).engine_config())
    assert_same_result(single, want)
    for target in cluster.targets:  # every replica answers the same, which is the one-process answer
        assert_same_result(fetch_result(target, "spread").result, single)
    time.sleep(0.5)
    assert list(finalizations.snapshot().values()) == [1]


def test_two_hundred_evaluations_racing_last_closes_finalize_exactly_200_times(
    cluster: Cluster, finalizations: Finalizations, postgres_url: str
) -> None:
    evaluations = 200
    cluster.start()
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(4, 10)).astype(np.float32)
    labels = np.arange(4, dtype=np.int64)
    clients = [EvalClient(t, retry=PATIENT) for t in cluster.targets]
    barriers = [threading.Barrier(WORLD, timeout=120) for _ in range(evaluations)]

    def rank(step: int, r: int) -> None:
        # The 8 ranks of an evaluation are spread over the 3 replicas and close together.
        ev = clients[(step + r) % 3].evaluation(
            run="race", model="m", step=step, rank=r, world_size=WORLD, num_classes=10, open_timeout=120
        )
        ev.add(scores, labels)
        barriers[step].wait()
        ev.close(timeout=120)

    try:
        with ThreadPoolExecutor(3 * WORLD) as pool:
            futures = [pool.submit(rank, step, r) for step in range(evaluations) for r in range(WORLD)]
            for f in futures:
                f.result(timeout=600)
        for step in (0, evaluations - 1):
            clients[step % 3].wait_for("race", "m", step=step, timeout=120)
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 60
    while sum(finalizations.snapshot().values()) < evaluations and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a second finalize of any of them would have arrived by now
    counts = finalizations.snapshot()
    assert len(counts) == evaluations and set(counts.values()) == {1}, counts.most_common(3)
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute(
            "SELECT state, num_samples, closed FROM evaluations WHERE run = 'race'"
        ).fetchall()
    assert len(rows) == evaluations
    assert set(rows) == {("finalized", 4 * WORLD, WORLD)}


def test_a_replica_killed_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path, finalizations: Finalizations, postgres_url: str
) -> None:
    cluster = Cluster(tmp_path, postgres_url, metrics=True)
    try:
        _kill_mid_stream(cluster, finalizations, postgres_url)
    finally:
        cluster.close()


def _kill_mid_stream(cluster: Cluster, finalizations: Finalizations, postgres_url: str) -> None:
    cluster.start()
    ranks = [rank_batches(r, 24, 64, CLASSES, seed=3) for r in range(4)]
    # Rank r starts on replica r % 3; its target lists the others after it, where it goes on.
    targets = [cluster.target_from(r % 3) for r in range(4)]
    runs = stream_ranks(targets, ranks, "killed", pace_s=0.05, chunk_bytes=1 << 14, retry=PATIENT)
    deadline = time.monotonic() + 120
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        while time.monotonic() < deadline:  # every rank has committed a few chunks
            committed = conn.execute("SELECT count(*) FROM shards WHERE chunks >= 3").fetchone()
            # ...and replica 0 serves at least one of them (a client may connect elsewhere first).
            if committed is not None and committed[0] == 4 and chunks_committed(cluster.metrics[0]) >= 3:
                break
            time.sleep(0.05)
        open_shards = conn.execute("SELECT count(*) FROM shards WHERE NOT closed").fetchone()
    assert open_shards == (4,), (
        "the streams ended before the kill",
        [chunks_committed(m) for m in cluster.metrics],
        [run.reconnects for run in runs],
        cluster.replicas[0].log_tail(1500),
    )
    cluster.replicas[0].kill()
    join(runs)
    assert sum(run.reconnects for run in runs) >= 1
    want = reference(ranks, CLASSES, Settings.load(cluster.replicas[1].config, env={}).engine_config())
    for target in cluster.targets[1:]:
        assert_same_result(fetch_result(target, "killed").result, want)
    time.sleep(0.5)
    assert list(finalizations.snapshot().values()) == [1]


def _finalizer_fault(cluster: Cluster, action: str) -> list[RankRun]:
    """Replica 0 takes both ranks and faults just before committing the finalize they trigger."""
    cluster.replicas[0].start_with_fault("finalize:before:1", action, wait=False)
    cluster.start(skip=(0,))
    cluster.replicas[0].wait_ready()
    ranks = [rank_batches(r, 2, 64, CLASSES, seed=9) for r in range(2)]
    impatient = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    return stream_ranks([cluster.targets[0]] * 2, ranks, "finalizer", retry=impatient)


def _wait_fault(cluster: Cluster) -> None:
    deadline = time.monotonic() + 120
    while "fault point finalize:before:1 reached" not in cluster.replicas[0].log_text():
        assert time.monotonic() < deadline, cluster.replicas[0].log_tail()
        time.sleep(0.05)


def test_a_finalizer_killed_during_finalize_is_replaced_after_its_claim_expires(
    cluster: Cluster, finalizations: Finalizations
) -> None:
    runs = _finalizer_fault(cluster, "kill")
    _wait_fault(cluster)
    killed_at = time.monotonic()
    cluster.replicas[0].proc.wait(30)  # type: ignore[union-attr]
    ranks = [rank_batches(r, 2, 64, CLASSES, seed=9) for r in range(2)]
    want = reference(ranks, CLASSES, Settings.load(cluster.replicas[1].config, env={}).engine_config())
    got = fetch_result(cluster.targets[1], "finalizer")
    assert time.monotonic() - killed_at < 60
    assert_same_result(got.result, want)
    assert_same_result(fetch_result(cluster.targets[2], "finalizer").result, want)
    time.sleep(0.5)
    assert list(finalizations.snapshot().values()) == [1]
    for run in runs:
        assert run.thread is not None
        run.thread.join(60)


def test_a_paused_finalizer_that_wakes_late_changes_nothing(
    cluster: Cluster, finalizations: Finalizations, postgres_url: str
) -> None:
    runs = _finalizer_fault(cluster, "stop")
    _wait_fault(cluster)
    got = fetch_result(cluster.targets[1], "finalizer")  # taken over once the claim expired
    with psycopg.connect(postgres_url) as conn:
        before = conn.execute("SELECT finalized_at, result, claim_epoch FROM evaluations").fetchall()
    assert len(before) == 1 and before[0][2] >= 2  # claimed twice: by the close, then by a sweep
    cluster.replicas[0].signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while "fault point finalize:before:1 passed" not in cluster.replicas[0].log_text():
        assert time.monotonic() < deadline, cluster.replicas[0].log_tail()
        time.sleep(0.05)
    with psycopg.connect(postgres_url) as conn:
        after = conn.execute("SELECT finalized_at, result, claim_epoch FROM evaluations").fetchall()
    assert after == before  # the late finalize committed nothing
    assert cluster.replicas[0].alive()
    assert_same_result(fetch_result(cluster.targets[0], "finalizer").result, got.result)
    time.sleep(0.5)
    assert list(finalizations.snapshot().values()) == [1]
    for run in runs:
        assert run.thread is not None
        run.thread.join(60)


def test_every_replica_compares_and_reads_the_same(cluster: Cluster) -> None:
    cluster.start()
    for model, seed in (("a", 21), ("b", 22)):
        ranks = [rank_batches(r, 2, 128, CLASSES, seed=seed) for r in range(3)]
        join(stream_ranks([cluster.targets[r] for r in range(3)], ranks, model))
    answers = []
    for target in cluster.targets:
        with EvalClient(target, retry=PATIENT) as client:
            client.wait_for("faults", "a", timeout=60)
            client.wait_for("faults", "b", timeout=60)
            compared = client.compare("faults", ["a", "b"], seed=7, bootstrap_replicates=200)
            got = client.get("faults", "b", include_per_class=True)
        answers.append(
            (compared.SerializeToString(deterministic=True), got.SerializeToString(deterministic=True))
        )
    assert answers[0] == answers[1] == answers[2]


def test_a_database_restart_stalls_streams_then_they_resume(
    cluster: Cluster, postgres_server: PostgresServer
) -> None:
    cluster.start()
    ranks = [rank_batches(r, 30, 64, CLASSES, seed=31) for r in range(3)]
    runs = stream_ranks(cluster.targets, ranks, "dbrestart", pace_s=0.05, chunk_bytes=1 << 14)
    time.sleep(1.0)
    postgres_server.kill()  # every connection of every replica breaks; commits in flight roll back
    time.sleep(2.0)
    postgres_server.start()
    join(runs)
    want = reference(ranks, CLASSES, Settings.load(cluster.replicas[0].config, env={}).engine_config())
    for target in cluster.targets:
        assert_same_result(fetch_result(target, "dbrestart").result, want)


def test_one_rank_streamed_to_two_replicas_is_held_by_one_stream_and_counted_once(
    cluster: Cluster, finalizations: Finalizations, postgres_url: str
) -> None:
    """A rank's second stream on another replica (a restarted job that reached a different pod) is
    refused (ABORTED, retried by the client) while the first lives, as on one server; once the first
    has closed the rank, the second's open finds it closed and fails with that, before it sent
    anything. The data is counted once."""
    cluster.start()
    ranks = [rank_batches(r, 12, 64, CLASSES, seed=41) for r in range(2)]
    first, second, other = RankRun(0), RankRun(0), RankRun(1)

    def start(run: RankRun, target: str, batches: list[tuple[np.ndarray, np.ndarray]], pace_s: float) -> None:
        kwargs = {"model": "twice", "world_size": 2, "batches": batches, "num_classes": CLASSES}
        kwargs |= {"pace_s": pace_s, "chunk_bytes": 1 << 14}
        run.thread = threading.Thread(target=stream_rank, args=(target, run), kwargs=kwargs, daemon=True)
        run.thread.start()

    start(first, cluster.targets[0], ranks[0], 0.05)
    deadline = time.monotonic() + 120
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM shards WHERE chunks >= 1").fetchone() != (1,):
            assert time.monotonic() < deadline and first.error is None, first.error
            time.sleep(0.02)
    start(second, cluster.targets[1], ranks[0], 0.0)  # the same rank, while the first streams
    start(other, cluster.targets[2], ranks[1], 0.0)
    join([first, other])
    assert second.thread is not None
    second.thread.join(120)
    assert first.reconnects == 0 and first.summary is not None and first.summary.samples == 12 * 64
    assert second.summary is None and "closed earlier" in str(second.error)
    want = reference(ranks, CLASSES, Settings.load(cluster.replicas[0].config, env={}).engine_config())
    for target in cluster.targets:
        assert_same_result(fetch_result(target, "twice").result, want)
    time.sleep(0.5)
    assert list(finalizations.snapshot().values()) == [1]
