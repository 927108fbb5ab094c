"""Clients reach every replica: a list of addresses or a dns:/// name, calls spread round-robin."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from evalstream.client import EvalClient
from evalstream.client.transport import channel_target
from tests.faults.workload import PATIENT, rank_batches
from tests.replicas.cluster import Cluster


def test_target_forms() -> None:
    balanced = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
    assert channel_target("127.0.0.1:1") == ("127.0.0.1:1", [])
    assert channel_target("localhost:50051") == ("localhost:50051", [])
    assert channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == ("ipv4:127.0.0.1:1,127.0.0.2:2", balanced)
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", balanced)
    assert channel_target(["[::1]:1", "[::1]:2"]) == ("ipv6:[::1]:1,[::1]:2", balanced)
    assert channel_target("dns:///evalstream.ml.svc:50051") == ("dns:///evalstream.ml.svc:50051", balanced)
    assert channel_target(["127.0.0.1:1"]) == ("127.0.0.1:1", [])
    # gRPC's own syntax keeps gRPC's default policy (pick_first).
    assert channel_target("ipv4:127.0.0.1:1,127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", [])


def test_a_list_of_names_is_refused_with_the_remedy() -> None:
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        channel_target(["replica-a:50051", "replica-b:50051"])


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, postgres_url, metrics=True)
    try:
        yield made
    finally:
        made.close()


def chunks_committed(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("evalstream_ingest_chunks_total")
    )


def test_one_client_spreads_its_ranks_over_every_replica(cluster: Cluster) -> None:
    cluster.start()
    world = 6
    with EvalClient(cluster.targets, retry=PATIENT) as client:
        for _ in range(2 * len(cluster.targets)):  # connect to every replica before the streams start
            client.metrics()
        errors: list[BaseException] = []

        def rank(r: int) -> None:
            try:
                scores, labels = rank_batches(r, 1, 32, 10, seed=4)[0]
                ev = client.evaluation(run="rr", model="m", rank=r, world_size=world, num_classes=10)
                ev.add(scores, labels)
                ev.close(timeout=60)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert client.wait_for("rr", "m", timeout=60).num_samples == 32 * world
    per_replica = [chunks_committed(address) for address in cluster.metrics]
    assert all(n > 0 for n in per_replica), per_replica
