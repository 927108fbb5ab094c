"""Waiters on one replica woken by a finalize on another: PostgreSQL LISTEN/NOTIFY, polling as fallback.

Three real server processes on one real PostgreSQL. Rank 0 closes on replica A, a GetEvaluation
long poll waits on replica B, the last close (or FinalizeEvaluation) on A finalizes. How B's wait
ended is read from B's /metrics (``evalstream_waits_total{outcome}``): ``notified`` when B's
listener relayed the NOTIFY, ``polled`` when B found it in the store while its listener was
away. Outcomes are asserted, never latencies.
"""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from evalstream.client import EvalClient
from evalstream.service.store.postgres_listen import application_name
from evalstream.v1 import evaluation_pb2
from tests.faults.workload import PATIENT, rank_batches
from tests.replicas.cluster import Cluster, Finalizations
from tests.support.postgres import PostgresServer

CLASSES = 10
RUN = "waiters"
PATIENCE_S = 90.0  # generous: what takes well under a second on an idle machine
A, B = 0, 1


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_url, metrics=True, max_wait_s=PATIENCE_S)
    try:
        yield made
    finally:
        made.close()


def until(what: str, check: Callable[[], bool], timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def samples(cluster: Cluster, replica: int) -> dict[tuple[str, str], float]:
    """The replica's wait metrics: (sample name, outcome label or "") -> value."""
    address = cluster.metrics[replica]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, s.labels.get("outcome", "")): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("evalstream_waits")
        for s in family.samples
    }


def waits(cluster: Cluster, replica: int) -> dict[str, float]:
    got = samples(cluster, replica)
    return {o: got[("evalstream_waits_total", o)] for o in ("notified", "polled", "timeout")}


def waiting(cluster: Cluster, replica: int) -> float:
    return samples(cluster, replica)[("evalstream_waits_in_progress", "")]


def close_rank(target: str, model: str, rank: int, world_size: int = 2, step: int = 0) -> None:
    with (
        EvalClient(target, retry=PATIENT) as client,
        client.evaluation(
            run=RUN, model=model, step=step, rank=rank, world_size=world_size, num_classes=CLASSES
        ) as ev,
    ):
        for scores, labels in rank_batches(rank, 2, 16, CLASSES, seed=step):
            ev.add(scores, labels)


def listener_pid(url: str, replica_pid: int) -> int | None:
    """The backend pid of the replica's listening session, if it is connected (``url``: any
    database of the server; pg_stat_activity shows every session)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name(replica_pid),)
        ).fetchone()
    return None if row is None else int(row[0])


def long_poll(target: str, model: str, step: int = 0) -> evaluation_pb2.Evaluation:
    with EvalClient(target, retry=PATIENT) as client:
        return client.get(RUN, model, step=step, wait=PATIENCE_S)


def test_a_waiter_on_one_replica_is_woken_by_a_finalize_on_another(
    cluster: Cluster, finalizations: Finalizations
) -> None:
    cluster.start()
    close_rank(cluster.targets[A], "notify", rank=0)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(long_poll, cluster.targets[B], "notify")
        until("the long poll to wait on B", lambda: waiting(cluster, B) == 1)
        close_rank(cluster.targets[A], "notify", rank=1)  # the last close: A finalizes
        got = held.result(timeout=PATIENCE_S)
    assert got.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert got.result.num_samples == 64
    assert waits(cluster, B) == {"notified": 1.0, "polled": 0.0, "timeout": 0.0}
    # One NOTIFY for the one finalization: every replica's listener heard the same one.
    until("the NOTIFY", lambda: finalizations.snapshot()[got.evaluation_id] >= 1)
    time.sleep(0.5)
    assert finalizations.snapshot()[got.evaluation_id] == 1


def test_a_waiter_polls_while_its_listener_is_away_and_the_listener_comes_back(
    cluster: Cluster, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """B's listening session is ended while the database refuses new connections: the NOTIFY is
    missed for sure, so B's waiter must find the finalization by polling; then the listener
    reconnects and the next waiter is notified again."""
    cluster.start()
    database = urllib.parse.urlparse(postgres_url).path.lstrip("/")
    admin = postgres_server.url()  # the "postgres" database, which keeps accepting connections
    replica_pid = cluster.replicas[B].pid
    until("B's listener", lambda: listener_pid(admin, replica_pid) is not None)
    first = listener_pid(admin, replica_pid)
    close_rank(cluster.targets[A], "dropped", rank=0)
    with ThreadPoolExecutor(1) as pool, psycopg.connect(admin, autocommit=True) as conn:
        held = pool.submit(long_poll, cluster.targets[B], "dropped")
        until("the long poll to wait on B", lambda: waiting(cluster, B) == 1)
        try:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(%s)", (first,))
            until("B's listener to be gone", lambda: listener_pid(admin, replica_pid) is None)
            # Replicas keep their pooled sessions: A finalizes, and B polls, over those.
            with EvalClient(cluster.targets[A], retry=PATIENT) as client:
                assert client.finalize(RUN, "dropped").state == evaluation_pb2.EVALUATION_STATE_FINALIZED
            got = held.result(timeout=PATIENCE_S)
            assert listener_pid(admin, replica_pid) is None  # it could not have been notified
        finally:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    assert got.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert waits(cluster, B) == {"notified": 0.0, "polled": 1.0, "timeout": 0.0}

    until("B's listener to reconnect", lambda: listener_pid(admin, replica_pid) not in (None, first))
    close_rank(cluster.targets[A], "again", rank=0)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(long_poll, cluster.targets[B], "again")
        until("the long poll to wait on B", lambda: waiting(cluster, B) == 1)
        close_rank(cluster.targets[A], "again", rank=1)
        assert held.result(timeout=PATIENCE_S).state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert waits(cluster, B) == {"notified": 1.0, "polled": 1.0, "timeout": 0.0}


def test_a_waiter_survives_a_database_restart(cluster: Cluster, postgres_server: PostgresServer) -> None:
    cluster.start()
    admin = postgres_server.url()
    replica_pid = cluster.replicas[B].pid
    until("B's listener", lambda: listener_pid(admin, replica_pid) is not None)
    first = listener_pid(admin, replica_pid)
    close_rank(cluster.targets[A], "restart", rank=0)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(long_poll, cluster.targets[B], "restart")
        until("the long poll to wait on B", lambda: waiting(cluster, B) == 1)
        postgres_server.restart(down_s=1.0)  # every session ends, the listener's too
        close_rank(cluster.targets[A], "restart", rank=1)
        got = held.result(timeout=PATIENCE_S)
    assert got.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    # Notified once the listener was back, or found by polling before it was: either way, once.
    outcome = waits(cluster, B)
    assert outcome["timeout"] == 0.0 and outcome["notified"] + outcome["polled"] == 1.0
    until("B's listener to reconnect", lambda: listener_pid(admin, replica_pid) not in (None, first))
