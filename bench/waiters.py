"""Waiters across replicas: how long after a finalize commits do waiters on other replicas have it?

Three servers on one PostgreSQL (a private cluster, ``tests/support/postgres.py``). Each of
``--evaluations`` evaluations has two ranks: rank 0 closes on replica A, then a waiter on each of
replicas B and C waits for the result, then, ``--delay`` seconds later, rank 1 closes on A and A
finalizes. A waiter's latency is the time from the finalize's commit (``finalized_at``, the
database clock; same machine, same clock) to the moment it holds the finalized evaluation.
Two kinds of waiter, in the same run:

- ``long poll``: ``EvalClient.wait_for`` (GetEvaluation with ``wait``; B and C are woken by the
  NOTIFY their listener hears);
- ``polling``: what ``wait_for`` did before, GetEvaluation in a loop, sleeping 50 ms growing by
  1.5x to 1 s between calls.

Also reported: the GetEvaluation calls per wait (counted in the client) and how B's and C's
waits ended (their ``evalstream_waits_total``: notified, polled).

Run: ``python -m bench.waiters [--evaluations 20] [--delay 1.0]``. Needs PostgreSQL's server
binaries (``tools/ensure_postgres.sh``).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ServerProcess, table, write_json
from evalstream.client import EvalClient
from evalstream.v1 import evaluation_pb2

CLASSES = 50
FINALIZED = evaluation_pb2.EVALUATION_STATE_FINALIZED


def _close_rank(target: str, model: str, step: int, rank: int) -> None:
    rng = np.random.default_rng([step, rank])
    with (
        EvalClient(target) as client,
        client.evaluation(
            run="bench", model=model, step=step, rank=rank, world_size=2, num_classes=CLASSES
        ) as ev,
    ):
        ev.add(rng.normal(size=(256, CLASSES)).astype(np.float32), rng.integers(0, CLASSES, 256))


class CountingClient(EvalClient):
    """An EvalClient that counts its GetEvaluation calls (``wait_for`` makes them through ``get``)."""

    calls = 0

    def get(self, *args: Any, **kwargs: Any) -> evaluation_pb2.Evaluation:
        self.calls += 1
        return super().get(*args, **kwargs)


def _long_poll(client: EvalClient, model: str, step: int) -> evaluation_pb2.Evaluation:
    return client.wait_for("bench", model, step=step, timeout=120)


def _polling(client: EvalClient, model: str, step: int) -> evaluation_pb2.Evaluation:
    """The client's wait before long polls: GetEvaluation, back-off from 50 ms to 1 s."""
    interval = 0.05
    while True:
        evaluation = client.get("bench", model, step=step)
        if evaluation.state == FINALIZED:
            return evaluation
        time.sleep(interval)
        interval = min(1.0, interval * 1.5)


Waiter = Callable[[EvalClient, str, int], evaluation_pb2.Evaluation]


def outcomes(servers: Sequence[ServerProcess]) -> dict[str, float]:
    """``evalstream_waits_total`` by outcome, summed over ``servers``."""
    out = {"notified": 0.0, "polled": 0.0, "timeout": 0.0}
    for server in servers:
        with urllib.request.urlopen(f"http://{server.metrics_target}/metrics", timeout=10) as reply:
            for family in text_string_to_metric_families(reply.read().decode()):
                for sample in family.samples:
                    if sample.name == "evalstream_waits_total":
                        out[sample.labels["outcome"]] += sample.value
    return out


def run(
    servers: Sequence[ServerProcess], waiter: Waiter, model: str, args: argparse.Namespace
) -> dict[str, Any]:
    latencies: list[float] = []
    targets = [s.target for s in servers]
    clients = [CountingClient(t) for t in targets[1:]]
    before = outcomes(servers[1:])
    try:
        for step in range(args.evaluations):
            _close_rank(targets[0], model, step, 0)
            seen: list[tuple[float, evaluation_pb2.Evaluation]] = []

            def wait(client: EvalClient, step: int = step) -> None:
                evaluation = waiter(client, model, step)
                seen.append((time.time(), evaluation))  # noqa: B023 (joined within this iteration)

            threads = [threading.Thread(target=wait, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            time.sleep(args.delay)
            _close_rank(targets[0], model, step, 1)
            for t in threads:
                t.join()
            for at, evaluation in seen:
                latencies.append(at - evaluation.finalized_at.ToNanoseconds() / 1e9)
        calls = sum(c.calls for c in clients)
    finally:
        for c in clients:
            c.close()
    after = outcomes(servers[1:])
    latencies.sort()
    return {
        "waits": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_ms": 1000 * latencies[-1],
        "calls_per_wait": calls / len(latencies),
        **{f"server_{k}": after[k] - before[k] for k in after},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--evaluations", type=int, default=20)
    p.add_argument(
        "--delay", type=float, default=1.0, help="seconds between the waiters' start and the last close"
    )
    args = p.parse_args(argv)
    from tests.support.postgres import running_postgres

    results: dict[str, Any] = {}
    with running_postgres() as pg:
        url = pg.create_database("bench")
        servers = [ServerProcess(store_url=url, engine_backend="eager") for _ in range(3)]
        try:
            results["long poll"] = run(servers, _long_poll, "long-poll", args)
            results["polling"] = run(servers, _polling, "polling", args)
        finally:
            for s in servers:
                s.close()
    rows = [{"waiter": name, **r} for name, r in results.items()]
    columns = [
        "waiter",
        "waits",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "calls_per_wait",
        "server_notified",
        "server_polled",
    ]
    print(table(rows, columns))
    write_json("waiters", {"args": vars(args), "results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
