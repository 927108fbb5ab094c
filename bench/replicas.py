"""Replicas: 3 servers on one PostgreSQL against 1 server on SQLite, the same load in the same run.

The load is ``--evaluations`` evaluations one after another, each of ``--ranks`` ranks streaming
concurrently (one client and one thread per rank, rank r to replica r % 3), every rank ``--batches``
batches of ``--rows`` x ``--classes`` float32 logits with fresh sample ids. Reported per setup:
end-to-end samples/s (first open to last close, summed over evaluations), the ratio of the
replicated setup to the single one, and the finalize latency of each evaluation: from the moment
the last rank's close returned to the moment every server answers it finalized (p50 / p99).
PostgreSQL is a private cluster (``tests/support/postgres.py``: Debian's server, fsync on, loopback).

``--reduce client`` runs the same comparison in records mode: each client reduces its scores to
per-sample records with the engine (``client.evaluation(..., reduce="client")``) and sends those,
so the servers only validate and commit records; reported as MB/s of records as well as samples/s.

Where the time goes, per setup, over the whole load (streaming and finalize): CPU microseconds a
sample of the client (this process), of the servers (summed), and of PostgreSQL (every process of
the private cluster: the postmaster, its live backends and workers, and the children it reaped,
from /proc); the store's commits (``evalstream_store_commit_seconds``: count, mean ms, and
commit-seconds per wall second, i.e. commits in flight on average); PostgreSQL's write
transactions (xid delta) and WAL bytes a sample (``pg_current_wal_insert_lsn`` delta); and the
cores the whole setup kept busy. The load average at the start of each setup is recorded.

Run: ``python -m bench.replicas [--evaluations 8] [--ranks 4] [--batches 6] [--rows 1024]
[--classes 500] [--reduce server|client]``. Needs PostgreSQL's server binaries
(``tools/ensure_postgres.sh``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ServerProcess, table, write_json
from bench.e2e import process_cpu_seconds
from evalstream.client import EvalClient
from evalstream.v1 import evaluation_pb2

MB = 1e6


def _rank(
    target: str, step: int, rank: int, world: int, batches: Sequence[Any], reduce: str, out: list[float]
) -> None:
    classes = int(batches[0][0].shape[1])
    with EvalClient(target) as client:
        ev = client.evaluation(
            run="bench",
            model="m",
            step=step,
            rank=rank,
            world_size=world,
            num_classes=classes,
            reduce="client" if reduce == "client" else "server",
            reduce_backend="eager",
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


# -- where the time goes ----------------------------------------------------------------------------


def _own_cpu_seconds() -> float:
    """This process (the clients: their threads, and in records mode their engine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU of a PostgreSQL cluster: the postmaster with the children it reaped (backends that
    ended), plus every live child (backends, checkpointer, WAL writer ...), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile (its time is then in the postmaster's cutime)
            continue
        if int(child[1]) == postmaster:
            total += (int(child[11]) + int(child[12])) / tick
    return total


def server_metrics(server: ServerProcess) -> dict[str, float]:
    """The figures of one server's /metrics this benchmark divides by samples."""
    wanted = {
        ("evalstream_store_commit_seconds_count", ""): "commits",
        ("evalstream_store_commit_seconds_sum", ""): "commit_s",
        ("evalstream_ingest_mode_bytes_total", "server"): "score_bytes",
        ("evalstream_ingest_mode_bytes_total", "client"): "record_bytes",
        ("evalstream_ingest_samples_total", ""): "samples",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    with urllib.request.urlopen(f"http://{server.metrics_target}/metrics", timeout=10) as reply:
        for family in text_string_to_metric_families(reply.read().decode()):
            for sample in family.samples:
                name = wanted.get((sample.name, sample.labels.get("mode", "")))
                if name is not None and set(sample.labels) <= {"mode"}:
                    out[name] += float(sample.value)
    return out


class Costs:
    """Snapshots of every counter above, before and after a load; ``per_sample`` the difference."""

    def __init__(self, servers: Sequence[ServerProcess], pg: Any = None, url: str = "") -> None:
        self.servers, self.pg, self.url = servers, pg, url

    def snapshot(self) -> dict[str, float]:
        snap = {
            "wall": time.perf_counter(),
            "client_cpu": _own_cpu_seconds(),
            "server_cpu": sum(process_cpu_seconds(s.pid) for s in self.servers),
        }
        for s in self.servers:
            for k, v in server_metrics(s).items():
                snap[k] = snap.get(k, 0.0) + v
        if self.pg is not None:
            import psycopg

            assert self.pg.process is not None
            snap["pg_cpu"] = postgres_cpu_seconds(self.pg.process.pid)
            with psycopg.connect(self.url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8, "
                    "pg_snapshot_xmax(pg_current_snapshot())::text::float8"
                ).fetchone()
            assert row is not None
            snap["wal_bytes"], snap["xids"] = float(row[0]), float(row[1])
        return snap

    @staticmethod
    def per_sample(
        before: dict[str, float], after: dict[str, float], seconds: float, wall: float | None = None
    ) -> dict[str, Any]:
        """Per sample; ``seconds`` the rates' time base, ``wall`` (default: between the snapshots) the
        time commits in flight and busy cores are averaged over."""
        d = {k: after[k] - before[k] for k in before}
        n, wall = d["samples"], wall or d["wall"]
        out: dict[str, Any] = {
            "client_us": 1e6 * d["client_cpu"] / n,
            "servers_us": 1e6 * d["server_cpu"] / n,
            "commits": d["commits"],
            "commit_ms": 1e3 * d["commit_s"] / max(d["commits"], 1),
            "commits_in_flight": d["commit_s"] / wall,
            "payload_MB_s": (d["score_bytes"] + d["record_bytes"]) / MB / seconds,
            "records_MB_s": d["record_bytes"] / MB / seconds,
        }
        busy = d["client_cpu"] + d["server_cpu"]
        if "pg_cpu" in d:
            out["postgres_us"] = 1e6 * d["pg_cpu"] / n
            out["wal_bytes_per_sample"] = d["wal_bytes"] / n
            out["write_xacts"] = d["xids"]
            busy += d["pg_cpu"]
        out["cores_busy"] = busy / wall
        return out


# -- the store alone ---------------------------------------------------------------------------------


def _records(rows: int, classes: int) -> bytes:
    """Real engine records of ``rows`` samples (what a server stores for one chunk)."""
    from evalstream.service.engine import EngineConfig
    from evalstream.service.engine.reducer import ChunkReducer

    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, size=rows, dtype=np.int64)
    scores = rng.normal(size=(rows, classes)).astype(np.float32)
    return (
        ChunkReducer(classes, EngineConfig(device="cpu", backend="eager")).reduce(scores, labels).to_bytes()
    )


def store_alone(store: Any, rows: int, classes: int, commits: int, pg: Any = None) -> dict[str, Any]:
    """``commits`` one-chunk blocks of ``rows`` samples' records, one after another from one thread,
    straight into the store: the database's floor cost per commit, without gRPC, the engine or
    other replicas competing for the GIL. Median ms a commit; CPU a commit of this process
    (Python, psycopg / sqlite3) and of PostgreSQL."""
    from evalstream.service.store import ChunkCommit, EvaluationKey, ShardOpenRequest

    records = _records(rows, classes)
    key = EvaluationKey("bench-store", f"rows-{rows}", "", int(time.time() * 1000))
    ev, _ = store.open_shard(ShardOpenRequest(key, 0, 1, classes, "logits", 0, False))
    times = []
    cpu0, pg0 = _own_cpu_seconds(), postgres_cpu_seconds(pg.process.pid) if pg is not None else 0.0
    wal0 = _wal_bytes(store) if pg is not None else 0.0
    for seq in range(commits):
        t0 = time.perf_counter()
        store.commit_chunks(ev.evaluation_id, 0, [ChunkCommit(seq, rows, records, 0.0, 0)])
        times.append(time.perf_counter() - t0)
    out = {
        "record_bytes": len(records),
        "commit_ms": 1e3 * statistics.median(times),
        "python_ms": 1e3 * (_own_cpu_seconds() - cpu0) / commits,
        "MB_s": len(records) * commits / MB / sum(times),
        "samples_per_s": rows * commits / sum(times),
    }
    if pg is not None:
        out["postgres_ms"] = 1e3 * (postgres_cpu_seconds(pg.process.pid) - pg0) / commits
        out["wal_per_record_byte"] = (_wal_bytes(store) - wal0) / (len(records) * commits)
    return out


def _wal_bytes(store: Any) -> float:
    """WAL written so far (bytes since 0/0): stored values after compression, page images, commits."""
    with store._pool.connection() as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8 AS b"
        ).fetchone()
    return float(row["b"])


def stores_alone(args: argparse.Namespace, pg: Any, url: str) -> list[dict[str, Any]]:
    """Each store, a load's chunk size (1 MiB of float32 scores) and a records-mode one (1 MiB of
    records), ``args.store_commits`` commits each."""
    import tempfile

    from evalstream.service.store import SqliteStore
    from evalstream.service.store.postgres import PostgresStore

    sizes = {"scores chunk": (1 << 20) // (4 * args.classes), "records chunk": (1 << 20) // 78}
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="evalstream-bench-") as tmp:
        stores = {
            "SQLite normal": SqliteStore(Path(tmp) / "normal", "normal"),
            "SQLite full": SqliteStore(Path(tmp) / "full", "full"),
            "PostgreSQL": PostgresStore(url),
        }
        try:
            for name, store in stores.items():
                for size, rows in sizes.items():
                    measured = store_alone(
                        store, rows, args.classes, args.store_commits, pg if name == "PostgreSQL" else None
                    )
                    rows_out.append({"store": name, "chunk": size, "samples": rows, **measured})
        finally:
            for store in stores.values():
                store.close()
    return rows_out


# How PostgreSQL stores the records' bytea values (``--pg-storage``), applied to the bench database
# after the servers created the schema (it changes values stored from then on): "schema" as the
# schema leaves it; "pglz" PostgreSQL's own default (EXTENDED storage: every value over ~2 kB is
# compressed with pglz in the inserting backend, and stored uncompressed when that saves < 25%);
# "external" out of line, never compressed; "lz4" compressed with lz4.
PG_STORAGE = {
    "schema": (),
    "pglz": tuple(
        f"ALTER TABLE {t} ALTER COLUMN {c} SET {what}"
        for t, c in (("chunks", "records"), ("final_records", "data"))
        for what in ("STORAGE EXTENDED", "COMPRESSION pglz")
    ),
    "external": tuple(
        f"ALTER TABLE {t} ALTER COLUMN {c} SET STORAGE EXTERNAL"
        for t, c in (("chunks", "records"), ("final_records", "data"))
    ),
    "lz4": tuple(
        f"ALTER TABLE {t} ALTER COLUMN {c} SET {what}"
        for t, c in (("chunks", "records"), ("final_records", "data"))
        for what in ("STORAGE EXTENDED", "COMPRESSION lz4")
    ),
}


def set_pg_storage(url: str, storage: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in PG_STORAGE[storage]:
            conn.execute(statement)  # type: ignore[arg-type]  # our own constant DDL


# -- the load -----------------------------------------------------------------------------------------


def run_records_ingest(
    targets: Sequence[str], args: argparse.Namespace, costs: Costs, step: int
) -> dict[str, Any]:
    """The records path at the servers' capacity: ``args.ranks`` client processes (rank r to
    target r % 3) send ``args.records_ingest`` precomputed ~1 MiB RecordsChunk messages each
    (``bench.records``' worker: real engine records, a window of 32 unacknowledged messages, no
    engine on the client while sending), so nothing but gRPC, validation and the commit is timed.
    The ranks open their shards and build their message first, then start together; rates from
    the first message to the last acknowledgement; costs over that span, before the closes (the
    close and finalize are timed on their own)."""
    import multiprocessing as mp

    from bench.records import _ingest_worker

    ctx = mp.get_context("spawn")
    out, close_now, go = ctx.Queue(), ctx.Event(), ctx.Event()
    load_average = os.getloadavg()[0]
    procs = [
        ctx.Process(
            target=_ingest_worker,
            args=(targets[r % len(targets)], r, args.ranks, step, args.records_ingest, out, close_now, go),
        )
        for r in range(args.ranks)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:  # every rank's shard is open and its message built
        out.get(timeout=900)
    before = costs.snapshot()
    go.set()
    parts = [out.get(timeout=900) for _ in procs]
    after = costs.snapshot()
    close_now.set()
    closes = [out.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join(60)
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    samples = sum(p["samples"] for p in parts)
    spent = Costs.per_sample(before, after, seconds, wall=seconds)
    del spent["client_us"]  # the clients are other processes here
    return {
        "load_average": load_average,
        "samples": samples,
        "samples_per_s": samples / seconds,
        **spent,
        "close_finalize_s": max(c["closed"] for c in closes) - max(p["end"] for p in parts),
    }


def run_load(
    targets: Sequence[str], args: argparse.Namespace, batches: Sequence[Any], costs: Costs
) -> dict[str, Any]:
    load_average = os.getloadavg()[0]
    before = costs.snapshot()
    seconds = 0.0
    latencies = []
    for step in range(args.evaluations):
        closed = [0.0] * args.ranks
        threads = [
            threading.Thread(
                target=_rank,
                args=(targets[r % len(targets)], step, r, args.ranks, batches, args.reduce, closed),
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
    time.sleep(0.5)  # the last scrape-visible counters (finalize is already visible everywhere)
    spent = Costs.per_sample(before, costs.snapshot(), seconds)
    latencies.sort()
    return {
        "load_average": load_average,
        **spent,
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
    p.add_argument("--reduce", choices=("server", "client"), default="server")
    p.add_argument("--store-commits", type=int, default=100, help="commits of the store-alone part (0: skip)")
    p.add_argument("--pg-storage", choices=sorted(PG_STORAGE), default="schema")
    p.add_argument("--store-only", action="store_true", help="only the store-alone part")
    p.add_argument(
        "--records-ingest", type=int, default=0, help="precomputed ~1 MiB records messages a rank (0: skip)"
    )
    args = p.parse_args(argv)
    from tests.support.postgres import running_postgres

    if args.reduce == "client":
        # Imported here, once: the client imports torch lazily, and four rank threads doing that
        # at the same moment can see a partly initialized module.
        import torch  # noqa: F401

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
    ingest: dict[str, Any] = {}
    if not args.store_only:
        with ServerProcess(**overrides) as single:
            results["1 server, SQLite"] = run_load([single.target], args, batches, Costs([single]))
            if args.records_ingest:
                ingest["1 server, SQLite"] = run_records_ingest([single.target], args, Costs([single]), 0)
    with running_postgres() as pg:
        url = pg.create_database("bench")
        if args.store_only:
            from evalstream.service.store.postgres import PostgresStore

            PostgresStore(url).close()  # the schema
            set_pg_storage(url, args.pg_storage)
        else:
            servers = [ServerProcess(store_url=url, **overrides) for _ in range(3)]
            try:
                set_pg_storage(url, args.pg_storage)
                costs = Costs(servers, pg, url)
                targets = [s.target for s in servers]
                results["3 replicas, PostgreSQL"] = run_load(targets, args, batches, costs)
                if args.records_ingest:
                    ingest["3 replicas, PostgreSQL"] = run_records_ingest(targets, args, costs, 0)
            finally:
                for s in servers:
                    s.close()
        alone = stores_alone(args, pg, url) if args.store_commits else []
    rows: list[dict[str, Any]] = []
    if results:
        base = results["1 server, SQLite"]["samples_per_s"]
        rows = [{"setup": name, **r, "ratio": r["samples_per_s"] / base} for name, r in results.items()]
        print(f"reduce={args.reduce}, pg storage {args.pg_storage}; load average ", end="")
        print(f"{rows[0]['load_average']:.1f} / {rows[1]['load_average']:.1f}")
        print(
            table(rows, ["setup", "samples", "samples_per_s", "ratio", "finalize_p50_ms", "finalize_p99_ms"])
        )
        print(
            table(rows, ["setup", "payload_MB_s", "records_MB_s", "client_us", "servers_us", "postgres_us"])
        )
        columns = ["commits", "commit_ms", "commits_in_flight", "write_xacts", "wal_bytes_per_sample"]
        print(table(rows, ["setup", *columns, "cores_busy"]))
    ingested: list[dict[str, Any]] = []
    if ingest:
        base = ingest["1 server, SQLite"]["samples_per_s"]
        ingested = [{"setup": name, **r, "ratio": r["samples_per_s"] / base} for name, r in ingest.items()]
        print(f"records ingest, precomputed, {args.ranks} ranks x {args.records_ingest} messages")
        columns = ["samples", "samples_per_s", "ratio", "records_MB_s", "servers_us", "postgres_us"]
        print(table(ingested, ["setup", *columns, "close_finalize_s"]))
        columns = ["commits", "commit_ms", "commits_in_flight", "wal_bytes_per_sample", "cores_busy"]
        print(table(ingested, ["setup", *columns]))
    if alone:
        columns = ["record_bytes", "commit_ms", "python_ms", "postgres_ms", "wal_per_record_byte", "MB_s"]
        print(f"store alone, pg storage {args.pg_storage}")
        print(table(alone, ["store", "chunk", "samples", *columns, "samples_per_s"]))
    payload = {"args": vars(args), "results": rows, "records_ingest": ingested, "store_alone": alone}
    name = "replicas" if args.reduce == "server" else "replicas-client"
    if args.store_only:
        name = f"replicas-store-{args.pg_storage}"
    elif args.pg_storage != "schema":
        name += f"-{args.pg_storage}"
    write_json(name, payload)
    return payload


if __name__ == "__main__":
    main()
