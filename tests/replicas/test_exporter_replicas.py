"""With three replicas on one database, each evaluation's gauges come from exactly one of them.

Every replica serves /metrics (its own service counters); the evaluation gauges, read from the
shared database, are exported only by the replica holding the exporter lease, and another takes
over when it dies, so a dashboard summing over replicas counts every evaluation once.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from evalstream.client import EvalClient
from tests.faults.workload import PATIENT, rank_batches
from tests.replicas.cluster import Cluster

GAUGE = 'evalstream_eval_samples{model="m"'


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_url, metrics=True)
    try:
        yield made
    finally:
        made.close()


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


def exporters(cluster: Cluster) -> list[int]:
    """Replicas (indices) whose /metrics carry the evaluation's gauge."""
    return [i for i, r in enumerate(cluster.replicas) if r.alive() and GAUGE in scrape(cluster.metrics[i])]


def test_evaluation_gauges_come_from_one_replica_and_move_when_it_dies(cluster: Cluster) -> None:
    cluster.start()
    scores, labels = rank_batches(0, 1, 32, 10, seed=1)[0]
    with EvalClient(cluster.targets[1], retry=PATIENT) as client:
        ev = client.evaluation(run="r", model="m", num_classes=10)
        ev.add(scores, labels)
        ev.close(timeout=60)
        client.wait_for("r", "m", timeout=60)
    found = exporters(cluster)
    assert len(found) == 1, found
    for address in cluster.metrics:  # every replica still serves its own service counters
        assert "evalstream_" in scrape(address)
    cluster.replicas[found[0]].kill()
    deadline = time.monotonic() + 30
    while not (after := exporters(cluster)):
        assert time.monotonic() < deadline, "no replica took over the evaluation gauges"
        time.sleep(0.2)
    assert len(after) == 1 and after != found
