"""Memory: server peak RSS while ingesting 1 million samples at 3,000 classes, and stored bytes per sample.

The real server (own process, default settings) ingests one evaluation from
``--ranks`` rank processes until it is finalized. The server's resident set is
sampled every 0.1 s: if memory is bounded by the configured buffers (staging
blocks, reducer scratch, gRPC windows) and not by the samples, it is flat
after the first blocks; the table shows it at each quarter of the run. Stored
bytes per sample are the finalized records file and the SQLite database
divided by the samples.

Run: ``python -m bench.memory [--samples 1000000] [--ranks 1] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ServerProcess, rss_bytes, table, write_json
from bench.e2e import BATCH, C, Ranks

MIB = 1 << 20


def _tree_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def _settled_bytes(data_dir: Path, timeout_s: float = 10.0) -> int:
    """Database + WAL size once the store has given finalized chunks' pages back.

    The store frees those pages in bounded steps after a finalize (and truncates
    the WAL at the end), so the size right after the finalize reply overstates
    what stays on disk; wait until it stops shrinking.
    """
    deadline = time.monotonic() + timeout_s
    size = _tree_bytes(data_dir, "evalstream.db*")
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _tree_bytes(data_dir, "evalstream.db*")
        if now >= size:
            return now
        size = now
    return size


def run(samples: int, ranks: int, dtype: str) -> dict[str, Any]:
    with ServerProcess() as server:
        pool = Ranks(server, ranks)
        try:
            pool.run(0, dtype, BATCH * ranks)  # warm-up evaluation: connections, reducers, staging
            idle_rss = rss_bytes(server.pid)
            trace: list[tuple[float, int]] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    trace.append((time.perf_counter(), rss_bytes(server.pid)))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            result = pool.run(1, dtype, samples)
            done.set()
            sampler.join()
        finally:
            pool.close()
        peak = server.peak_rss()
        records = _tree_bytes(server.data_dir / "records", "*")
        database = _settled_bytes(server.data_dir)
    n = result["samples"]
    # Only the measured evaluation's records (the warm-up one is small and counted in the database).
    quarters = []
    for q in (0.25, 0.5, 0.75, 1.0):
        t = started + q * result["seconds"]
        quarters.append(max((rss for ts, rss in trace if ts <= t), default=idle_rss))
    row = {
        "samples": n,
        "classes": C,
        "dtype": dtype,
        "ranks": ranks,
        "logits GiB": n * C * (4 if dtype == "float32" else 2) / 2**30,
        "idle MiB": idle_rss / MIB,
        "RSS@25% MiB": quarters[0] / MIB,
        "RSS@50% MiB": quarters[1] / MIB,
        "RSS@75% MiB": quarters[2] / MIB,
        "RSS@100% MiB": quarters[3] / MIB,
        "peak MiB": peak / MIB,
        "records B/sample": records / n,
        "db+records B/sample": (records + database) / n,
        "samples/s": result["samples_per_s"],
    }
    return {"rows": [row], "rss_trace": [(ts - started, rss) for ts, rss in trace], "run": result}


COLUMNS = [
    "samples",
    "dtype",
    "ranks",
    "logits GiB",
    "idle MiB",
    "RSS@25% MiB",
    "RSS@50% MiB",
    "RSS@75% MiB",
    "RSS@100% MiB",
    "peak MiB",
    "records B/sample",
    "db+records B/sample",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    result = run(args.samples, args.ranks, args.dtype)
    print(table(result["rows"], COLUMNS))
    write_json("memory", result)
    return result


if __name__ == "__main__":
    main()
