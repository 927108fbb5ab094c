"""End to end: the real client streams a 3,000-class workload into the real server, until finalize.

Each rank is its own process (as in a training job) holding a few [4096, C]
torch batches it ``add()``s repeatedly with fresh sample ids; the server is
another process with its default settings and a SQLite store in a temporary
directory. One run is one evaluation: from the moment every rank is released
until the last rank's ``close()`` returns with the finalized evaluation.
In the same run, the transport ceiling (``bench.transport``: a plain gRPC
client-streaming sink of 1 MiB messages) is measured between repeats, and the
ratio of end-to-end logits bytes/s to it is reported.

The server runs the engine backend of ``--backend`` (default ``auto``, the server's default:
compiled where a C++ compiler is found); the first (warm-up) run of each dtype includes the
kernel's compile, and its wall time is reported as "warm-up s".

Run: ``python -m bench.e2e [--samples 98304] [--repeats 3] [--ranks 1,4] [--dtypes float32,bfloat16]
[--backend auto|eager|compiled]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import transport
from bench.common import ServerProcess, table, write_json

C = 3000
BATCH = 4096
MIB = 1 << 20
ENGINE_SECONDS = "evalstream_chunk_compute_seconds_sum"


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Job:
    """One rank's part of one run."""

    step: int
    dtype: str
    batches: int
    world_size: int
    chunk_bytes: int = MIB


def make_batches(dtype: str, count: int = 3, seed: int = 0) -> list[tuple[Any, Any]]:
    """A few distinct [BATCH, C] torch batches (logits leaning to an imbalanced label) and labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, C + 1, dtype=torch.float64)
    out = []
    for _ in range(count):
        labels = torch.multinomial(weights, BATCH, replacement=True, generator=g)
        scores = torch.randn(BATCH, C, generator=g)
        scores[torch.arange(BATCH), labels] += 2.0 + torch.randn(BATCH, generator=g)
        out.append((scores.to(getattr(torch, dtype)), labels))
    return out


def _rank_worker(target: str, rank: int, jobs: Any, barrier: Any, results: Any) -> None:
    """Child process: one rank of a training job, streaming each job's batches when released."""
    import torch

    from evalstream.client import EvalClient

    data: dict[str, list[tuple[Any, Any]]] = {}
    client = EvalClient(target)
    while (job := jobs.get()) is not None:
        batches = data.get(job.dtype) or data.setdefault(job.dtype, make_batches(job.dtype, seed=rank))
        barrier.wait()
        start = time.perf_counter()
        cpu0 = _cpu_seconds()
        add_seconds = 0.0
        with client.evaluation(
            run="bench-e2e",
            model=f"{job.dtype}-{job.world_size}",
            num_classes=C,
            step=job.step,
            rank=rank,
            world_size=job.world_size,
            chunk_bytes=job.chunk_bytes,
        ) as stream:
            for i in range(job.batches):
                scores, labels = batches[i % len(batches)]
                first = (i * job.world_size + rank) * BATCH
                ids = torch.arange(first, first + BATCH)
                t0 = time.perf_counter()
                stream.add(scores, labels, sample_ids=ids)
                add_seconds += time.perf_counter() - t0
        end = time.perf_counter()
        cpu = _cpu_seconds() - cpu0
        summary = stream.summary
        assert summary is not None
        results.put(
            {
                "rank": rank,
                "start": start,
                "end": end,
                "samples": summary.samples,
                "finalized": summary.finalized,
                "add_seconds": add_seconds,
                "cpu_seconds": cpu,
            }
        )
    client.close()


class Ranks:
    """``world_size`` rank processes kept alive across runs (torch import and data once)."""

    def __init__(self, server: ServerProcess, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.server = server
        target = server.target
        self.world_size = world_size
        self.barrier = ctx.Barrier(world_size)
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_rank_worker, args=(target, r, self.jobs[r], self.barrier, self.results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, step: int, dtype: str, samples: int, chunk_bytes: int = MIB) -> dict[str, Any]:
        batches = max(1, -(-samples // (BATCH * self.world_size)))
        server_cpu0 = process_cpu_seconds(self.server.pid)
        engine0 = self.server.metric(ENGINE_SECONDS)
        for q in self.jobs:
            q.put(Job(step, dtype, batches, self.world_size, chunk_bytes))
        parts = [self.results.get(timeout=600) for _ in range(self.world_size)]
        server_cpu = process_cpu_seconds(self.server.pid) - server_cpu0
        engine = self.server.metric(ENGINE_SECONDS) - engine0
        elapsed = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        n = sum(p["samples"] for p in parts)
        expected = batches * BATCH * self.world_size
        if n != expected or not any(p["finalized"] for p in parts):
            raise RuntimeError(
                f"run committed {n} of {expected} samples; finalized={[p['finalized'] for p in parts]}"
            )
        itemsize = 4 if dtype == "float32" else 2
        return {
            "seconds": elapsed,
            "samples": n,
            "samples_per_s": n / elapsed,
            "logits_gb_per_s": n * C * itemsize / elapsed / 1e9,
            "add_ms_per_batch": 1e3 * statistics.median(p["add_seconds"] for p in parts) / batches,
            # CPU per sample: where the machine's two cores went.
            "client_cpu_us_per_sample": 1e6 * sum(p["cpu_seconds"] for p in parts) / n,
            "server_cpu_us_per_sample": 1e6 * server_cpu / n,
            # Wall time in the engine's reduce calls (both workers), from the server's own histogram.
            "engine_us_per_sample": 1e6 * engine / n,
        }

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.terminate()


def engine_cpu_us_per_sample(dtype: str, blocks: int = 8, backend: str = "eager") -> float:
    """CPU per sample of the engine alone, as the server runs it: one thread, 1,024-row blocks."""
    import torch

    from evalstream.service.engine import EngineConfig
    from evalstream.service.engine.reducer import ChunkReducer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reducer = ChunkReducer(C, EngineConfig(device="cpu", block_rows=1024, backend=backend), "logits")
        scores, labels = make_batches(dtype, count=1)[0]
        block = 1024
        reducer.reduce(scores[:block], labels[:block])
        t0 = time.thread_time()
        for i in range(blocks):
            start = (i * block) % BATCH
            reducer.reduce(scores[start : start + block], labels[start : start + block])
        return 1e6 * (time.thread_time() - t0) / (blocks * block)
    finally:
        torch.set_num_threads(threads)


class Ceiling:
    """The transport ceiling (``bench.transport``'s plain gRPC sink, raw 1 MiB messages), kept running.

    Each measurement also tells the CPU both ends spent per float32 sample
    (12,000 bytes at C=3,000): the floor under any service on this machine.
    """

    def __init__(self, backend: str = "eager") -> None:
        import grpc

        self.dtype = "float32"
        self.backend = backend
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        self.process = ctx.Process(target=transport._serve, args=(ports,), daemon=True)
        self.process.start()
        port = ports.get(timeout=120)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        grpc.channel_ready_future(self.channel).result(timeout=30)
        transport._stream(self.channel, "raw", MIB, 0.3)  # warm-up

    def measure(self, seconds: float) -> dict[str, float]:
        assert self.process.pid is not None
        server0, client0 = process_cpu_seconds(self.process.pid), _cpu_seconds()
        nbytes, elapsed = transport._stream(self.channel, "raw", MIB, seconds)
        server = process_cpu_seconds(self.process.pid) - server0
        client = _cpu_seconds() - client0
        samples = nbytes / (4 * C)
        return {
            "engine_cpu_us_per_sample": engine_cpu_us_per_sample(self.dtype, backend=self.backend),
            "load_average": os.getloadavg()[0],
            "bytes_per_s": nbytes / elapsed,
            "client_cpu_us_per_sample": 1e6 * client / samples,
            "server_cpu_us_per_sample": 1e6 * server / samples,
        }

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.join(5)


def run(
    samples: int,
    repeats: int,
    ranks: list[int],
    dtypes: list[str],
    ceiling_seconds: float,
    chunk_bytes: int = MIB,
    backend: str = "auto",
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    step = 0
    limit = Ceiling(backend)
    try:
        with ServerProcess(engine_backend=backend) as server:
            for world in ranks:
                pool = Ranks(server, world)
                try:
                    for dtype in dtypes:
                        # Warm-up: connections, reducers, data, and the compiled kernel of this dtype.
                        warm = pool.run(step, dtype, BATCH * world)
                        step += 1
                        runs, ceilings = [], []
                        for _ in range(repeats):
                            runs.append(pool.run(step, dtype, samples, chunk_bytes))
                            step += 1
                            limit.dtype = dtype
                            ceilings.append(limit.measure(ceiling_seconds))
                        rows.append({**_row(world, dtype, runs, ceilings), "warm-up s": warm["seconds"]})
                finally:
                    pool.close()
            rss = server.peak_rss()
    finally:
        limit.close()
    return {
        "samples_per_run": samples,
        "repeats": repeats,
        "chunk_bytes": chunk_bytes,
        "engine_backend": backend,
        "rows": rows,
        "server_peak_rss_bytes": rss,
    }


def _row(
    world: int, dtype: str, runs: list[dict[str, Any]], ceilings: list[dict[str, float]]
) -> dict[str, Any]:
    rates = [r["samples_per_s"] for r in runs]
    gbs = [r["logits_gb_per_s"] for r in runs]
    # Ratio per repeat against the ceiling measured right after it, then the median.
    ratios = [g * 1e9 / c["bytes_per_s"] for g, c in zip(gbs, ceilings, strict=True)]
    ceiling_bytes = statistics.median(c["bytes_per_s"] for c in ceilings)
    ceiling_f32 = ceiling_bytes / (4 * C)
    return {
        "ranks": world,
        "dtype": dtype,
        "samples/s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "GB/s": statistics.median(gbs),
        "ceiling GB/s": ceiling_bytes / 1e9,
        "ceiling f32 samples/s": ceiling_f32,
        "x ceiling (bytes)": statistics.median(ratios),
        "x ceiling (samples)": statistics.median(rates) / ceiling_f32,
        "add ms/batch": statistics.median(r["add_ms_per_batch"] for r in runs),
        "client cpu us/sample": statistics.median(r["client_cpu_us_per_sample"] for r in runs),
        "server cpu us/sample": statistics.median(r["server_cpu_us_per_sample"] for r in runs),
        "engine wall us/sample": statistics.median(r["engine_us_per_sample"] for r in runs),
        "engine alone cpu us/sample": statistics.median(c["engine_cpu_us_per_sample"] for c in ceilings),
        "load average": statistics.median(c["load_average"] for c in ceilings),
        "ceiling client cpu us/sample": statistics.median(c["client_cpu_us_per_sample"] for c in ceilings),
        "ceiling server cpu us/sample": statistics.median(c["server_cpu_us_per_sample"] for c in ceilings),
        "runs": runs,
        "ceilings": ceilings,
    }


COLUMNS = [
    "ranks",
    "dtype",
    "samples/s",
    "min",
    "max",
    "GB/s",
    "ceiling GB/s",
    "x ceiling (bytes)",
    "x ceiling (samples)",
    "add ms/batch",
    "client cpu us/sample",
    "server cpu us/sample",
    "engine alone cpu us/sample",
    "ceiling client cpu us/sample",
    "ceiling server cpu us/sample",
    "warm-up s",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24 * BATCH, help="samples per run (all ranks)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ceiling-seconds", type=float, default=1.5)
    ap.add_argument("--chunk-mib", type=float, default=1.0, help="client chunk_bytes in MiB")
    ap.add_argument("--backend", default="auto", choices=("auto", "eager", "compiled"), help="engine backend")
    args = ap.parse_args(argv)
    result = run(
        args.samples,
        args.repeats,
        [int(r) for r in args.ranks.split(",")],
        args.dtypes.split(","),
        args.ceiling_seconds,
        int(args.chunk_mib * MIB),
        args.backend,
    )
    print(table(result["rows"], COLUMNS))
    print(f"server peak RSS {result['server_peak_rss_bytes'] / 2**20:,.0f} MiB")
    write_json("e2e", result)
    return result


if __name__ == "__main__":
    main()
