"""Records mode (``reduce="client"``): server ingest capacity, end to end, and the cost of ``add()``.

Three parts, one command, every ratio measured in the same run:

1. ``ingest``: the server's capacity for records. Client processes send precomputed RecordsChunk
   messages (~1 MiB, real engine records, fresh sample ids per message; no engine on the client)
   with a window of unacknowledged messages, as the real client does; the server validates and
   commits them to its SQLite store. Samples/s from the first message to the last
   acknowledgement (all committed), against the raw-logit transport ceiling at C=3,000 float32
   (``bench.transport``'s plain gRPC sink of 1 MiB messages, 12,000 bytes a sample) measured
   between repeats. Finalize (merge, dedupe, metrics of every record) is timed on its own.
2. ``e2e``: the real client, one rank in its own process, streaming [rows, C] torch batches
   with ``reduce="client"`` (eager, and the opt-in compiled engine) and ``reduce="server"``, at
   C=3,000 float32, 32,768 and 131,072 bfloat16; until the finalized evaluation. Client and
   server share the machine, so on a 2-core host the client's engine is the limit. The engine's
   own cost per sample and per class is measured alone at each C.
3. ``add``: the training loop's cost of ``add()`` in client mode per [4096, 3,000] batch against
   the TorchMetrics update of the same batch (top-1/top-5 accuracy, 15-bin ECE, mean NLL).

Run: ``python -m bench.records [--parts ingest,e2e,add] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
from typing import Any

from bench.common import ServerProcess, peak_rss_bytes, rss_bytes, table, write_json
from bench.e2e import Ceiling, process_cpu_seconds

MIB = 1 << 20
C_INGEST = 3000
WINDOW = 32


# -- 1. ingest capacity -----------------------------------------------------------------------------


def _ingest_worker(
    target: str, rank: int, world: int, step: int, messages: int, out: Any, close_now: Any, go: Any = None
) -> None:
    """Child process: one shard streaming ``messages`` precomputed RecordsChunk requests; reports when
    all are acknowledged, then closes (finalizing the evaluation) once ``close_now`` is set. With
    ``go`` (an Event), it reports ``{"ready": rank}`` once its message is built and sends only once
    ``go`` is set, so the ranks start together."""
    import grpc
    import numpy as np
    import torch

    from evalstream.client.sender import raw_stream_call
    from evalstream.service.engine import EngineConfig
    from evalstream.service.engine.reducer import ChunkReducer
    from evalstream.service.records_wire import (
        LAYOUT_VERSION,
        encode_columns,
        layout_for,
        request_from_columns,
    )
    from evalstream.v1 import evaluation_pb2, service_pb2

    torch.set_num_threads(1)
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    key = evaluation_pb2.EvaluationKey(run="bench-records", model=f"ingest-{world}", step=step)
    open_shard = service_pb2.OpenShard(
        key=key,
        rank=rank,
        world_size=world,
        num_classes=C_INGEST,
        reduce=service_pb2.REDUCE_MODE_CLIENT,
        records_layout_version=LAYOUT_VERSION,
        ack_mode=service_pb2.ACK_MODE_CUMULATIVE,
    )
    requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    requests.put(service_pb2.StreamEvaluationRequest(open=open_shard).SerializeToString())
    call = raw_stream_call(channel)(iter(requests.get, None))
    reply = next(call).opened.records_layout
    layout = layout_for(tuple(reply.inverse_temperatures), reply.max_rank)
    rows = min(MIB // layout.record_bytes, int(reply.max_rows))
    rng = np.random.default_rng(rank)
    labels = rng.integers(0, C_INGEST, rows)
    scores = rng.standard_normal((rows, C_INGEST)).astype(np.float32)
    scores[np.arange(rows), labels] += 2.0
    records = ChunkReducer(C_INGEST, EngineConfig(device="cpu", backend="eager")).reduce(scores, labels)
    columns = encode_columns(records, layout)
    id_column = [c.name for c in layout.columns].index("sample_id")
    window = threading.Semaphore(WINDOW)
    done = threading.Event()
    acked = [0]

    def read() -> None:
        for response in call:
            if response.WhichOneof("message") == "ack":
                for _ in range(response.ack.next_sequence - acked[0]):
                    window.release()
                acked[0] = response.ack.next_sequence
                if acked[0] >= messages:
                    done.set()
            elif response.WhichOneof("message") == "closed":
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if go is not None:
        out.put({"ready": rank})
        go.wait()
    start = time.perf_counter()
    for seq in range(messages):
        window.acquire()
        first = (seq * world + rank) * rows
        columns[id_column] = np.arange(first, first + rows, dtype="<i8").tobytes()
        requests.put(request_from_columns(columns, rows, layout.version, seq))
    done.wait()
    end = time.perf_counter()
    out.put({"start": start, "end": end, "samples": messages * rows})
    close_now.wait()  # the parent reads the server's memory before any rank closes (and finalizes)
    requests.put(
        service_pb2.StreamEvaluationRequest(
            close=service_pb2.CloseShard(num_chunks=messages)
        ).SerializeToString()
    )
    requests.put(None)
    reader.join(timeout=600)
    out.put({"closed": time.perf_counter()})
    channel.close()


def ingest(
    samples: int, repeats: int, worlds: list[int], ceiling_seconds: float, settle_s: float = 0.0
) -> list[dict[str, Any]]:
    """Ingest capacity per stream count. ``settle_s``: a pause after each run's finalize, so the store's
    reclaim of that evaluation's chunks (a finalize frees them) does not run during the next run."""
    from evalstream.service.engine import EngineConfig
    from evalstream.service.records_wire import layout_for

    default = EngineConfig()
    record_bytes = layout_for(default.inverse_temperatures, default.max_rank).record_bytes
    ctx = mp.get_context("spawn")
    rows_out: list[dict[str, Any]] = []
    limit = Ceiling("eager")
    step = 0
    try:
        with ServerProcess(engine_backend="eager") as server:
            for world in worlds:
                rates, finals, ceilings, cpu, rss = [], [], [], [], []
                for rep in range(repeats + 1):  # the first run warms connections and the store
                    per_rank = max(1, samples // (world * (MIB // record_bytes)))
                    out, close_now = ctx.Queue(), ctx.Event()
                    server_cpu0 = process_cpu_seconds(server.pid)
                    procs = [
                        ctx.Process(
                            target=_ingest_worker,
                            args=(server.target, r, world, step, per_rank, out, close_now),
                        )
                        for r in range(world)
                    ]
                    for p in procs:
                        p.start()
                    parts = [out.get(timeout=900) for _ in procs]
                    ingest_cpu = process_cpu_seconds(server.pid) - server_cpu0
                    rss_ingested = rss_bytes(server.pid)
                    close_now.set()
                    closes = [out.get(timeout=900) for _ in procs]
                    for p in procs:
                        p.join(60)
                    step += 1
                    time.sleep(settle_s)
                    n = sum(p["samples"] for p in parts)
                    elapsed = max(p["end"] for p in parts) - min(p["start"] for p in parts)
                    if rep == 0:
                        continue
                    rates.append(n / elapsed)
                    finals.append(max(c["closed"] for c in closes) - max(p["end"] for p in parts))
                    cpu.append(1e6 * ingest_cpu / n)
                    rss.append(rss_ingested / MIB)
                    ceilings.append(limit.measure(ceiling_seconds)["bytes_per_s"] / (4 * C_INGEST))
                rate, ceiling = statistics.median(rates), statistics.median(ceilings)
                rows_out.append(
                    {
                        "streams": world,
                        "samples/run": n,
                        "records samples/s": rate,
                        "min": min(rates),
                        "max": max(rates),
                        "ceiling f32 C=3000 samples/s": ceiling,
                        "x ceiling": statistics.median(r / c for r, c in zip(rates, ceilings, strict=True)),
                        "server cpu us/sample": statistics.median(cpu),
                        "close+finalize s": statistics.median(finals),
                        "server RSS after ingest MiB": max(rss),
                        "server peak RSS MiB": peak_rss_bytes(server.pid) / MIB,
                        "runs samples/s": rates,
                        "runs server cpu us/sample": cpu,
                    }
                )
    finally:
        limit.close()
    return rows_out


# -- 2. end to end ----------------------------------------------------------------------------------

CASES = [(3000, "float32"), (32768, "bfloat16"), (131072, "bfloat16")]
# (reduce, client engine backend, copy): the logits path (the server's default compiled engine), the
# client's default eager engine, the opt-in compiled one, and compiled without add()'s host copy.
MODES = [
    ("server", "eager", True),
    ("client", "eager", True),
    ("client", "compiled", True),
    ("client", "compiled", False),
]
# With CUDA tensors: the logits path (add() copies the scores to the host) against the client's engine
# on the device (eager: the compiled CUDA kernel needs Triton and is opt-in).
CUDA_MODES = [("server", "eager", True), ("client", "eager", True)]


def _batches(c: int, dtype: str, rows: int, count: int = 2, device: str = "cpu") -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(c)
    out = []
    for _ in range(count):
        labels = torch.randint(0, c, (rows,), generator=g)
        scores = torch.randn(rows, c, generator=g)
        scores[torch.arange(rows), labels] += 3.0
        out.append((scores.to(getattr(torch, dtype)).to(device), labels.to(device)))
    return out


def _e2e_worker(target: str, jobs: Any, results: Any, device: str = "cpu", threads: int = 0) -> None:
    """Child process: one rank; each job streams ``batches`` batches in one mode and reports.
    ``threads`` > 0 sets the process's torch threads (what a training process would have set)."""
    import torch

    from evalstream.client import EvalClient

    if threads > 0:
        torch.set_num_threads(threads)
    client = EvalClient(target)
    data: dict[tuple[int, str], list[tuple[Any, Any]]] = {}
    while (job := jobs.get()) is not None:
        c, dtype, rows, batches, mode, backend, copy, step = job
        key = (c, dtype)
        if key not in data:
            data.clear()
            data[key] = _batches(c, dtype, rows, device=device)
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        cpu0 = os.times()
        add_s = 0.0
        with client.evaluation(
            run="bench-records-e2e",
            model=f"{c}-{mode}-{backend}",
            step=step,
            num_classes=c,
            reduce=mode,
            reduce_backend=backend,
            copy=copy,
        ) as ev:
            for i in range(batches):
                scores, labels = data[key][i % 2]
                t0 = time.perf_counter()
                ev.add(scores, labels, sample_ids=torch.arange(i * rows, (i + 1) * rows))
                add_s += time.perf_counter() - t0
        end = time.perf_counter()
        cpu1 = os.times()
        summary = ev.summary
        assert summary is not None and summary.finalized
        cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
        results.put({"seconds": end - start, "samples": summary.samples, "add_s": add_s, "cpu_s": cpu})
    client.close()


def engine_us_per_sample(c: int, dtype: str, backend: str, rows: int) -> float:
    """CPU µs a sample of the engine alone, one torch thread, on the client's batches (after a warm-up
    call). CPU time of this thread, not wall time, so that other load on the machine does not count."""
    import torch

    from evalstream.service.engine import EngineConfig
    from evalstream.service.engine.reducer import ChunkReducer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reducer = ChunkReducer(c, EngineConfig(device="cpu", backend=backend))
        scores, labels = _batches(c, dtype, rows, count=1)[0]
        reducer.reduce(scores[:64], labels[:64])
        t0 = time.thread_time()
        reducer.reduce(scores, labels)
        return 1e6 * (time.thread_time() - t0) / rows
    finally:
        torch.set_num_threads(threads)


def engine_gpu_us_per_sample(c: int, dtype: str, backend: str, rows: int) -> float:
    """Wall µs a sample of the engine alone on the GPU (synchronized), after a warm-up call."""
    import torch

    from evalstream.service.engine import EngineConfig
    from evalstream.service.engine.reducer import ChunkReducer

    reducer = ChunkReducer(c, EngineConfig(device="cuda", backend=backend))
    scores, labels = _batches(c, dtype, rows, count=1, device="cuda")[0]
    reducer.reduce(scores, labels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        reducer.reduce(scores, labels)
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / (5 * rows)


def e2e(
    repeats: int,
    budget_bytes: int,
    cases: list[tuple[int, str]] | None = None,
    modes: list[tuple[str, str, bool]] | None = None,
    device: str = "cpu",
    threads: int = 0,
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out: list[dict[str, Any]] = []
    step = 0
    cases = cases or CASES
    modes = modes or (MODES if device == "cpu" else CUDA_MODES)
    with ServerProcess() as server:
        jobs, results = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(
            target=_e2e_worker, args=(server.target, jobs, results, device, threads), daemon=True
        )
        proc.start()
        try:
            for c, dtype in cases:
                itemsize = 4 if dtype == "float32" else 2
                rows = max(64, min(4096, (64 * MIB) // (c * itemsize)))
                batches = max(2, budget_bytes // (rows * c * itemsize))
                rates: dict[str, float] = {}
                projected: dict[str, float] = {}
                for mode, backend, copy in modes:
                    jobs.put((c, dtype, rows, 1, mode, backend, copy, step))  # warm-up (and compile)
                    results.get(timeout=900)
                    step += 1
                    runs = []
                    for _ in range(repeats):
                        server0 = process_cpu_seconds(server.pid)
                        jobs.put((c, dtype, rows, batches, mode, backend, copy, step))
                        runs.append(results.get(timeout=900))
                        runs[-1]["server_cpu_s"] = process_cpu_seconds(server.pid) - server0
                        step += 1
                    rate = statistics.median(r["samples"] / r["seconds"] for r in runs)
                    name = (
                        mode if mode == "server" else f"client-{backend}" + ("" if copy else ", copy=False")
                    )
                    rates[name] = rate
                    client_us = statistics.median(1e6 * r["cpu_s"] / r["samples"] for r in runs)
                    server_us = statistics.median(1e6 * r["server_cpu_s"] / r["samples"] for r in runs)
                    # What two otherwise idle cores would sustain: 2 s of CPU a second over the CPU a sample.
                    projected[name] = 2e6 / (client_us + server_us)
                    out.append(
                        {
                            "C": c,
                            "dtype": dtype,
                            "mode": name,
                            "samples/s": rate,
                            "x logits path": rate / rates["server"],
                            "add ms/batch": 1e3 * statistics.median(r["add_s"] for r in runs) / batches,
                            "client cpu us/sample": client_us,
                            "server cpu us/sample": server_us,
                            "cpu-bound samples/s": projected[name],
                            "x logits (cpu)": projected[name] / projected["server"],
                            "batch rows": rows,
                            "samples/run": runs[0]["samples"],
                        }
                    )
                for backend in ("eager", "compiled") if device == "cpu" else ("eager",):
                    if device == "cpu":
                        us = engine_us_per_sample(c, dtype, backend, min(rows, 1024))
                    else:
                        us = engine_gpu_us_per_sample(c, dtype, backend, rows)
                    out.append(
                        {
                            "C": c,
                            "dtype": dtype,
                            "mode": f"engine alone, {backend}",
                            "engine cpu us/sample": us,
                            "engine ns/class": 1e3 * us / c,
                        }
                    )
        finally:
            jobs.put(None)
            proc.join(60)
    return out


# -- 3. add() cost ----------------------------------------------------------------------------------


def add_cost(batches: int) -> list[dict[str, Any]]:
    import torch

    from bench.client_cost import _metrics
    from bench.e2e import BATCH, C, make_batches
    from evalstream.client import EvalClient

    rows = []
    for dtype in ("float32", "bfloat16"):
        data = make_batches(dtype)
        _, update = _metrics()
        for copy in (True, False):
            add_s, update_s = [], []
            with ServerProcess() as server, EvalClient(server.target) as client:
                with client.evaluation(
                    run="bench-records-add", model=dtype, num_classes=C, reduce="client", copy=copy
                ) as stream:
                    for i in range(2 + batches):
                        scores, labels = data[i % len(data)]
                        ids = torch.arange(i * BATCH, (i + 1) * BATCH)
                        t0 = time.perf_counter()
                        stream.add(scores, labels, sample_ids=ids)
                        t1 = time.perf_counter()
                        with torch.no_grad():
                            update(scores, labels)
                        t2 = time.perf_counter()
                        if i >= 2:
                            add_s.append(t1 - t0)
                            update_s.append(t2 - t1)
                waits = stream.stats.backpressure_waits
            add_ms, tm_ms = 1e3 * statistics.median(add_s), 1e3 * statistics.median(update_s)
            rows.append(
                {
                    "dtype": dtype,
                    "copy": copy,
                    "batch": f"[{BATCH}, {C}]",
                    "add() ms": add_ms,
                    "add max": 1e3 * max(add_s),
                    "torchmetrics ms": tm_ms,
                    "add / torchmetrics": add_ms / tm_ms,
                    "backpressure waits": waits,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ingest,e2e,add")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ingest-samples", type=int, default=2_000_000, help="records per ingest run")
    ap.add_argument("--ingest-streams", default="1,2")
    ap.add_argument(
        "--ingest-settle", type=float, default=0.0, help="seconds to wait after each ingest run's finalize"
    )
    ap.add_argument("--e2e-mib", type=int, default=256, help="score bytes per end-to-end run")
    ap.add_argument("--add-batches", type=int, default=8)
    ap.add_argument("--device", default="cpu", help='where the end-to-end scores live: "cpu" or "cuda"')
    ap.add_argument(
        "--cases",
        default="",
        help="end-to-end cases as C:dtype,... (default 3000:float32,32768:bfloat16,...)",
    )
    ap.add_argument(
        "--modes", default="", help="end-to-end modes as reduce:backend:copy,... (e.g. client:compiled:1)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the client process (0: default)")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    result: dict[str, Any] = {}
    if "ingest" in parts:
        worlds = [int(w) for w in args.ingest_streams.split(",")]
        result["ingest"] = ingest(args.ingest_samples, args.repeats, worlds, 1.5, args.ingest_settle)
        print(table(result["ingest"], [k for k in result["ingest"][0] if not k.startswith("runs ")]))
    if "e2e" in parts:
        cases = [(int(c), d) for c, d in (x.split(":") for x in args.cases.split(",") if x)]
        modes = [(r, b, cp == "1") for r, b, cp in (x.split(":") for x in args.modes.split(",") if x)]
        result["e2e"] = e2e(
            args.repeats, args.e2e_mib * MIB, cases or None, modes or None, args.device, args.threads
        )
        cols = [
            "C",
            "dtype",
            "mode",
            "samples/s",
            "x logits path",
            "add ms/batch",
            "client cpu us/sample",
            "server cpu us/sample",
            "cpu-bound samples/s",
            "x logits (cpu)",
            "engine cpu us/sample",
            "engine ns/class",
            "batch rows",
            "samples/run",
        ]
        print(table(result["e2e"], cols))
    if "add" in parts:
        result["add"] = add_cost(args.add_batches)
        print(table(result["add"], list(result["add"][0])))
    write_json("records" if args.device == "cpu" else f"records_{args.device}", result)
    return result


if __name__ == "__main__":
    main()
