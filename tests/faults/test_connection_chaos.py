"""Exactly once while a proxy drops, stalls and black-holes the connections of streaming ranks.

Every schedule streams three ranks through a seeded ``ChaosProxy``: two through
the client library (reconnect, reopen, replay what the server has not
committed) and one through ``naive_rank``, which re-sends everything since its
own last acknowledgement, so chunks committed but not acknowledged come back
and must be recognised. The server is one real process for the whole module.
"""

from __future__ import annotations

import threading

import pytest

from evalstream.client import RetryPolicy
from evalstream.service.settings import Settings
from tests.faults.chaos import ChaosProxy
from tests.faults.conftest import FaultLog
from tests.faults.harness import ServerProcess
from tests.faults.naive import NaiveStats, naive_rank
from tests.faults.workload import (
    RankRun,
    assert_same_result,
    fetch_result,
    join_ranks,
    rank_batches,
    reference,
    start_ranks,
)

NUM_CLASSES = 50
BATCHES = 12
ROWS = 40  # 8 KB of scores a chunk
PACE_S = 0.03
FAST = RetryPolicy(max_attempts=100, initial_backoff_s=0.02, max_backoff_s=0.3)


def _schedule(
    server: ServerProcess, seed: int, proxy: ChaosProxy, library_target: str = "", pace_s: float = PACE_S
) -> tuple[list[str], NaiveStats]:
    """Ranks 0 and 1 through the client library (via ``library_target``, the proxy by default),
    rank 2 through ``naive_rank`` via the proxy; then the exact-result check."""
    data = [rank_batches(r, BATCHES, ROWS, NUM_CLASSES, 1000 + seed) for r in range(3)]
    model = f"chaos-{seed}-{proxy.port}"
    runs = start_ranks(
        library_target or proxy.target,
        data[:2],
        world_size=3,
        model=model,
        num_classes=NUM_CLASSES,
        pace_s=pace_s,
        retry=FAST,
    )
    naive, stats = RankRun(2), NaiveStats()
    naive.thread = threading.Thread(
        target=naive_rank,
        args=(proxy.target, naive, stats),
        kwargs={
            "model": model,
            "world_size": 3,
            "batches": data[2],
            "num_classes": NUM_CLASSES,
            "pace_s": pace_s,
        },
        daemon=True,
    )
    naive.thread.start()
    join_ranks([*runs, naive], timeout=240)
    evaluation = fetch_result(server.target, model)
    config = Settings.load(server.config, env={}).engine_config()
    assert evaluation.result.num_samples == 3 * BATCHES * ROWS
    assert evaluation.result.duplicates_dropped == 0
    assert_same_result(evaluation.result, reference(data, NUM_CLASSES, config))
    return list(proxy.faults_fired), stats


@pytest.mark.parametrize("seed", range(6))
def test_dropped_and_stalled_connections_lose_and_duplicate_nothing(
    server: ServerProcess, seed: int, fault_log: FaultLog
) -> None:
    proxy = ChaosProxy(server.target, seed, max_faults=4)
    try:
        fired, stats = _schedule(server, seed, proxy)
    finally:
        proxy.close()
    print(f"seed {seed}: {proxy.connections} connections, faults {fired}, naive {stats}")
    fault_log.record("connection drop/stall", fired)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6, 36))
def test_connection_chaos_many_seeds(server: ServerProcess, seed: int, fault_log: FaultLog) -> None:
    proxy = ChaosProxy(server.target, seed, max_faults=6)
    try:
        fired, _ = _schedule(server, seed, proxy)
    finally:
        proxy.close()
    fault_log.record("connection drop/stall", fired)


def test_replies_lost_after_commit_are_resent_and_acknowledged_as_duplicates(
    server: ServerProcess, fault_log: FaultLog
) -> None:
    """Black-holed replies: the server commits chunks the rank never hears about, then the connection
    dies; the re-sent chunks are acknowledged as duplicates and counted once. Only the naive rank
    goes through the proxy here, slowly enough that the black hole opens and closes mid-stream."""
    proxy = ChaosProxy(
        server.target,
        seed=7,
        max_faults=1,
        fault_probability=1.0,
        actions=("blackhole",),
        max_after_reply_bytes=200,
    )
    try:
        fired, stats = _schedule(server, 7, proxy, library_target=server.target, pace_s=0.1)
    finally:
        proxy.close()
    assert fired, "the black hole never opened"
    assert stats.resent > 0 and stats.duplicates > 0, stats
    fault_log.record("connection drop/stall", fired)
