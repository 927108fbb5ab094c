"""Replicas: 3 servers on one PostgreSQL against 1 server on SQLite, the same load in the same run.

The load is ``--evaluations`` evaluations one after another, each of ``--ranks`` ranks streaming
concurrently (one client and one thread per rank, rank r to replica r % 3), every rank ``--batches``
batches of ``--rows`` x ``--classes`` float32 logits with fresh sample ids. Reported per setup:
end-to-end samples/s (first open to last close, summed over evaluations), the ratio of the
replicated setup to the single one, and the finalize latency of each evaluation: from the moment
the last rank's close returned to the moment every server answers it finalized (p50 / p99).
PostgreSQL is a private cluster (``tests/support/postgres.py``: Debian's server, fsync on, loopback).

Run: ``python -m bench.replicas [--evaluations 8] [--ranks 4] [--batches 6] [--rows 1024]
[--classes 500]``. Needs PostgreSQL's server binaries (``tools/ensure_postgres.sh``).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import ServerProcess, table, write_json
from evalstream.client import EvalClient
from evalstream.v1 import evaluation_pb2


def _rank(target: str, step: int, rank: int, world: int, batches: Sequence[Any], out: list[float]) -> None:
    classes = int(batches[0][0].shape[1])
    with EvalClient(target) as client:
        ev = client.evaluation(
            run="bench", model="m", step=step, rank=rank, world_size=world, num_classes=classes
        )
        for i, (scores, labels) in enumerate(batches):
            ids = np.arange(len(labels), dtype=np.int64) + (rank * len(batches) + i) * len(labels)
            ev.add(scores, labels, sample_ids=ids)
        ev.close(timeout=600)
    out[rank] = time.perf_counter()


def _finalized_everywhere(targets: Sequence[str], step: int, timeout: float = 600.0) -> float:
    deadline = time.perf_counter() + timeout
    clients = [EvalClient(t) for t in targets]
    try:
        for client in clients:
            while True:
                row = client.get("bench", "m", step=step)
                if row.state == evaluation_pb2.EVALUATION_STATE_FINALIZED:
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"step {step} not finalized everywhere")
                time.sleep(0.002)
        return time.perf_counter()
    finally:
        for client in clients:
            client.close()


def run_load(targets: Sequence[str], args: argparse.Namespace, batches: Sequence[Any]) -> dict[str, Any]:
    seconds = 0.0
    latencies = []
    for step in range(args.evaluations):
        closed = [0.0] * args.ranks
        threads = [
            threading.Thread(
                target=_rank, args=(targets[r % len(targets)], step, r, args.ranks, batches, closed)
            )
            for r in range(args.ranks)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last_close = max(closed)
        visible = _finalized_everywhere(targets, step)
        seconds += last_close - start
        latencies.append(visible - last_close)
    samples = args.evaluations * args.ranks * args.batches * args.rows
    latencies.sort()
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "finalize_p50_ms": 1000 * statistics.median(latencies),
        "finalize_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--evaluations", type=int, default=8)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--classes", type=int, default=500)
    args = p.parse_args(argv)
    from tests.support.postgres import running_postgres

    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(size=(args.rows, args.classes)).astype(np.float32),
            rng.integers(0, args.classes, size=args.rows, dtype=np.int64),
        )
        for _ in range(args.batches)
    ]
    overrides = {"engine_backend": "eager", "retention_keep_latest": 0}
    results: dict[str, Any] = {}
    with ServerProcess(**overrides) as single:
        results["1 server, SQLite"] = run_load([single.target], args, batches)
    with running_postgres() as pg:
        url = pg.create_database("bench")
        servers = [ServerProcess(store_url=url, **overrides) for _ in range(3)]
        try:
            results["3 replicas, PostgreSQL"] = run_load([s.target for s in servers], args, batches)
        finally:
            for s in servers:
                s.close()
    base = results["1 server, SQLite"]["samples_per_s"]
    rows = [{"setup": name, **r, "ratio": r["samples_per_s"] / base} for name, r in results.items()]
    print(table(rows, ["setup", "samples", "samples_per_s", "ratio", "finalize_p50_ms", "finalize_p99_ms"]))
    write_json("replicas", {"args": vars(args), "results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
