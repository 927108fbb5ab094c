"""Load: many concurrent rank streams of a 3,000-class workload into one server, loopback only.

One evaluation with ``--streams`` ranks (default 64). Client processes (``--procs``)
each drive an equal share of the ranks, one thread and one StreamEvaluation
call per rank, over raw stubs with pre-encoded chunks so the client costs
little and the server is what is measured. Each rank keeps at most
``--window`` chunks unacknowledged (as the client library does) and records,
per chunk, the time from handing it to gRPC to its acknowledgement.

Reported: errors (any non-OK status or in-band rejection), acknowledgement
latency percentiles (p50/p99/max), per-stream throughput and its spread
(slowest and fastest stream against the median: no stream may be starved,
i.e. all within 3x of the median), aggregate samples/s, the server's peak RSS
(VmHWM) and whether the finalized evaluation holds exactly the samples sent.
Bounded in time and count: ``--chunks`` chunks of ``--rows`` samples per rank.

Run: ``python -m bench.load [--streams 64] [--chunks 24] [--rows 80] [--procs 4]``;
writes bench/results/load.json. ``run_load`` is also what tests/robustness runs, smaller.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import ServerProcess, peak_rss_bytes, table, write_json

C = 3000
STARVATION_FACTOR = 3.0


@dataclass
class StreamResult:
    rank: int
    samples: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class LoadReport:
    streams: int
    chunks_per_stream: int
    rows_per_chunk: int
    num_classes: int
    errors: list[str]
    samples_sent: int
    samples_finalized: int
    wall_seconds: float
    samples_per_s: float
    ack_latency_ms: dict[str, float]
    stream_samples_per_s: dict[str, float]
    slowest_vs_median: float
    fastest_vs_median: float
    starved_streams: int
    server_peak_rss_bytes: int
    server_rss_before_bytes: int
    finalize_seconds: float

    @property
    def ok(self) -> bool:
        return not self.errors and self.starved_streams == 0 and self.samples_finalized == self.samples_sent


def _payload(rows: int, num_classes: int, seed: int) -> bytes:
    """A serialized Chunk without its sequence (appended per message): Zipf labels, leaning logits."""
    import numpy as np

    from evalstream.v1 import service_pb2
    from evalstream.wire import encode_tensor

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_classes + 1)
    labels = rng.choice(num_classes, size=rows, p=weights / weights.sum()).astype(np.int64)
    scores = rng.standard_normal((rows, num_classes), dtype=np.float32)
    scores[np.arange(rows), labels] += 3.0
    return service_pb2.Chunk(scores=encode_tensor(scores), labels=encode_tensor(labels)).SerializeToString()


def _chunk_message(payload: bytes, sequence: int) -> bytes:
    """StreamEvaluationRequest{chunk: payload + sequence}: protobuf fields may come in any order."""
    from evalstream import wire

    chunk = payload + wire.varint_field(wire.CHUNK_SEQUENCE, sequence)
    return wire.len_field(wire.REQUEST_CHUNK, len(chunk)) + chunk


def _stream(
    target: str, model: str, rank: int, world: int, chunks: int, rows: int, window: int, start: Any
) -> StreamResult:
    import grpc

    from evalstream.v1 import evaluation_pb2, service_pb2

    result = StreamResult(rank)
    payload = _payload(rows, C, seed=rank)
    opened = service_pb2.StreamEvaluationRequest(
        open=service_pb2.OpenShard(
            key=evaluation_pb2.EvaluationKey(run="load", model=model, split="validation", step=0),
            rank=rank,
            world_size=world,
            num_classes=C,
        )
    ).SerializeToString()
    close = service_pb2.StreamEvaluationRequest(
        close=service_pb2.CloseShard(num_chunks=chunks)
    ).SerializeToString()
    sent_at: dict[int, float] = {}
    credits = threading.Semaphore(window)

    def requests() -> Any:
        yield opened
        for seq in range(chunks):
            credits.acquire()
            message = _chunk_message(payload, seq)
            sent_at[seq] = time.perf_counter()
            yield message
        yield close

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        call = channel.stream_stream(
            "/evalstream.v1.EvalStreamService/StreamEvaluation",
            request_serializer=None,
            response_deserializer=service_pb2.StreamEvaluationResponse.FromString,
        )
        start.wait()
        t0 = time.perf_counter()
        try:
            for response in call(requests(), timeout=600):
                kind = response.WhichOneof("message")
                if kind == "ack":
                    seq = response.ack.next_sequence - 1
                    result.latencies.append(time.perf_counter() - sent_at[seq])
                    if response.ack.HasField("rejection"):
                        result.error = f"rank {rank}: rejected {response.ack.rejection.reason}"
                    credits.release()
                elif kind == "closed":
                    result.samples = response.closed.samples
        except grpc.RpcError as exc:
            result.error = f"rank {rank}: {exc.code().name}: {exc.details()}"
        result.seconds = time.perf_counter() - t0
    return result


def _client_process(
    target: str,
    model: str,
    ranks: list[int],
    world: int,
    chunks: int,
    rows: int,
    window: int,
    start: Any,
    out: Any,
) -> None:
    """One client process: a thread per rank, all released by ``start`` at once."""
    results: list[StreamResult] = []
    lock = threading.Lock()

    def run(rank: int) -> None:
        r = _stream(target, model, rank, world, chunks, rows, window, start)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([asdict(r) for r in results])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def run_load(
    streams: int = 64,
    chunks: int = 24,
    rows: int = 80,
    procs: int = 4,
    window: int = 8,
    server: ServerProcess | None = None,
    model: str = "load",
) -> LoadReport:
    """Drive ``streams`` ranks at once into ``server`` (a fresh one when None) and measure."""
    own = server is None
    srv = server or ServerProcess(max_open_shards_per_connection=max(64, streams))
    ctx = mp.get_context("spawn")
    try:
        rss_before = peak_rss_bytes(srv.pid)
        start, out = ctx.Event(), ctx.Queue()
        shares = [list(range(p, streams, procs)) for p in range(procs)]
        workers = [
            ctx.Process(
                target=_client_process,
                args=(srv.target, model, share, streams, chunks, rows, window, start, out),
                daemon=True,
            )
            for share in shares
            if share
        ]
        for w in workers:
            w.start()
        time.sleep(1.0)  # let every client process import and connect before the start signal
        t0 = time.perf_counter()
        start.set()
        results: list[StreamResult] = []
        for _ in workers:
            try:
                results += [StreamResult(**r) for r in out.get(timeout=900)]
            except queue.Empty:
                break
        wall = time.perf_counter() - t0
        for w in workers:
            w.join(timeout=30)
        t1 = time.perf_counter()
        finalized = _finalized_samples(srv.target, model)
        finalize_s = time.perf_counter() - t1
        peak = peak_rss_bytes(srv.pid)
    finally:
        if own:
            srv.close()
    errors = [r.error for r in results if r.error]
    if len(results) < streams:
        errors.append(f"only {len(results)} of {streams} streams reported")
    latencies = [x for r in results for x in r.latencies]
    rates = [r.samples_per_s for r in results if not r.error]
    median = statistics.median(rates) if rates else 0.0
    sent = sum(r.samples for r in results)
    return LoadReport(
        streams=streams,
        chunks_per_stream=chunks,
        rows_per_chunk=rows,
        num_classes=C,
        errors=errors,
        samples_sent=streams * chunks * rows,
        samples_finalized=finalized if sent == streams * chunks * rows else -1,
        wall_seconds=wall,
        samples_per_s=sent / wall if wall > 0 else 0.0,
        ack_latency_ms={
            "p50": 1e3 * _percentile(latencies, 50),
            "p90": 1e3 * _percentile(latencies, 90),
            "p99": 1e3 * _percentile(latencies, 99),
            "max": 1e3 * max(latencies, default=float("nan")),
            "count": float(len(latencies)),
        },
        stream_samples_per_s={
            "min": min(rates, default=0.0),
            "median": median,
            "max": max(rates, default=0.0),
        },
        slowest_vs_median=median / min(rates) if rates and min(rates) > 0 else float("inf"),
        fastest_vs_median=max(rates) / median if rates and median > 0 else float("inf"),
        starved_streams=sum(1 for x in rates if x * STARVATION_FACTOR < median),
        server_peak_rss_bytes=peak,
        server_rss_before_bytes=rss_before,
        finalize_seconds=finalize_s,
    )


def _finalized_samples(target: str, model: str) -> int:
    """Samples of the finalized evaluation (the last close finalizes it; wait briefly if needed)."""
    from evalstream.client import EvalClient

    with EvalClient(target) as client:
        return int(client.wait_for("load", model, timeout=300).result.num_samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=24, help="chunks per stream")
    ap.add_argument("--rows", type=int, default=80, help="samples per chunk (80 x 3,000 f32 = 960 KB)")
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--window", type=int, default=8, help="unacknowledged chunks per stream")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    report = run_load(args.streams, args.chunks, args.rows, args.procs, args.window)
    payload = asdict(report) | {"ok": report.ok}
    path = write_json("load", payload)
    row = {
        "streams": report.streams,
        "samples/s": report.samples_per_s,
        "p50 ms": report.ack_latency_ms["p50"],
        "p99 ms": report.ack_latency_ms["p99"],
        "slowest/median": report.slowest_vs_median,
        "peak RSS MB": report.server_peak_rss_bytes / 1e6,
        "errors": len(report.errors),
    }
    print(table([row], list(row)))
    print(f"finalized {report.samples_finalized} of {report.samples_sent} samples; wrote {path}")
    for e in report.errors[:10]:
        print("error:", e)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
