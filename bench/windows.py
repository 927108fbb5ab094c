"""gRPC's own receive buffers under many streams: HTTP/2 window settings against today's, one run.

The staging budget (``max_staging_bytes``) bounds what evalstream itself holds, but gRPC buffers
received bytes before the servicer reads them, up to each stream's HTTP/2 flow-control window;
by default that window grows with bandwidth-delay probes (BDP) and under 64 streams the server's
resident set went well past the staging budget. This runs the 64-stream load (``bench.load``)
against one fresh server per configuration, the configurations interleaved over ``--repeats``
rounds so machine load falls on all alike:

- ``today``: gRPC's own windows (``grpc_stream_window_bytes = 0``: 64 KiB initial window, BDP
  probing on), the server's settings before the fixed 1 MiB window became the default;
- ``bdp off``: that with ``grpc_bdp_probe = false`` (the window stays at gRPC's initial 64 KiB);
- ``window N``: ``grpc_stream_window_bytes = N`` (fixed window, probing off; 1 MiB is the default).

Each server first compiles the 3,000-class kernel (``warm_kernels``) and takes a small warm-up
load, so its peak RSS before the measured load already holds the compiler and the reducers.
Reported per configuration (medians over the rounds): aggregate samples/s and its ratio to
``today``, the server's CPU per sample (which machine load inflates far less than rates), peak
RSS growth during the load, and that growth beyond ``max_staging_bytes`` (the most the staging
blocks may hold) per client connection: what the per-connection allowance in
docs/performance.md has to cover.

Run: ``python -m bench.windows [--repeats 2] [--windows 262144,1048576]``; writes
bench/results/windows.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from bench.common import ServerProcess, peak_rss_bytes, table, write_json
from bench.load import run_load

MIB = 1 << 20
STREAMS = 64
PROCS = 4  # client processes; each holds one connection carrying STREAMS / PROCS streams
STAGING_BYTES = 512 * MIB  # the default max_staging_bytes, which every configuration keeps


def configurations(windows: list[int]) -> dict[str, dict[str, Any]]:
    # "today": the settings before the fixed window became the default, i.e. gRPC's own windows.
    configs: dict[str, dict[str, Any]] = {
        "today": {"grpc_stream_window_bytes": 0},
        "bdp off": {"grpc_stream_window_bytes": 0, "grpc_bdp_probe": False},
    }
    for w in windows:
        configs[f"window {w // 1024} KiB"] = {"grpc_stream_window_bytes": w}
    return configs


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(overrides: dict[str, Any], chunks: int, rows: int) -> dict[str, float]:
    """One fresh server: warm it, then the measured 64-stream load."""
    server = ServerProcess(
        max_open_shards_per_connection=STREAMS, warm_kernels=("3000:float32",), **overrides
    )
    try:
        warm = run_load(streams=PROCS, chunks=4, rows=rows, procs=PROCS, server=server, model="warm")
        if warm.errors:
            raise RuntimeError(f"warm-up load failed: {warm.errors[:3]}")
        before = peak_rss_bytes(server.pid)
        cpu = cpu_seconds(server.pid)
        report = run_load(streams=STREAMS, chunks=chunks, rows=rows, procs=PROCS, server=server)
        if report.errors or not report.ok:
            raise RuntimeError(f"load failed: {report.errors[:3]}")
        cpu = cpu_seconds(server.pid) - cpu
        peak = peak_rss_bytes(server.pid)
    finally:
        server.close()
    growth = peak - before
    return {
        "samples/s": report.samples_per_s,
        # Load on a shared machine inflates rates far more than CPU per sample (bench/RESULTS.md).
        "server us/sample": 1e6 * cpu / report.samples_sent,
        "before MiB": before / MIB,
        "peak MiB": peak / MIB,
        "growth MiB": growth / MIB,
        "beyond staging MiB/conn": max(0, growth - STAGING_BYTES) / MIB / PROCS,
        "p99 ack ms": report.ack_latency_ms["p99"],
        "slowest/median": report.slowest_vs_median,
    }


def run(repeats: int, windows: list[int], chunks: int, rows: int) -> dict[str, Any]:
    configs = configurations(windows)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for r in range(repeats):
        for name, overrides in configs.items():
            m = measure(overrides, chunks, rows)
            runs[name].append(m)
            print(
                f"round {r + 1} {name}: {m['samples/s']:.0f} samples/s, peak {m['peak MiB']:.0f} MiB",
                flush=True,
            )
    base = statistics.median(m["samples/s"] for m in runs["today"])
    rows_out = []
    for name, ms in runs.items():
        row: dict[str, Any] = {"config": name}
        for key in ms[0]:
            row[key] = statistics.median(m[key] for m in ms)
        row["x today"] = row["samples/s"] / base
        rows_out.append(row)
    return {"rows": rows_out, "runs": runs, "streams": STREAMS, "connections": PROCS, "chunks": chunks}


COLUMNS = [
    "config",
    "samples/s",
    "x today",
    "server us/sample",
    "before MiB",
    "peak MiB",
    "growth MiB",
    "beyond staging MiB/conn",
    "p99 ack ms",
    "slowest/median",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--windows", default=f"{256 * 1024},{MIB}", help="fixed windows to try, bytes")
    ap.add_argument("--chunks", type=int, default=24, help="chunks per stream")
    ap.add_argument("--rows", type=int, default=80, help="samples per chunk (80 x 3,000 f32 = 960 KB)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    result = run(args.repeats, windows, args.chunks, args.rows)
    print(table(result["rows"], COLUMNS))
    write_json("windows", result)
    return result


if __name__ == "__main__":
    main()
