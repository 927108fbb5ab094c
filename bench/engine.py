"""Engine throughput at C=3,000: ChunkReducer against a TorchMetrics set on the same data, same run.

Engine: ``ChunkReducer.reduce`` over every chunk (records out), default settings
(top-1/5, 15 bins, the 10-point temperature grid) and minimal settings (no
temperature grid), each with the eager and the compiled backend. TorchMetrics
set: ``MulticlassAccuracy`` top-1 and top-5, ``MulticlassCalibrationError``
(15 bins, L1) and ``F.cross_entropy``, updated chunk by chunk and computed at
the end. Every thread count runs the whole table (ratios are same-run, same
threads); ``compute_metrics`` on the merged records is timed separately (once
per evaluation, not per chunk). Compile times: the first compiled chunk in this
process (inductor's disk cache as it is), and in fresh processes with an empty
and then a warm cache.

    .venv/bin/python -m bench.engine [--rows N] [--threads 1,2] [--repeat R] [--rounds K] [--quick]

On a shared machine run several rounds: each row then reports the median over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import measure, ratio, table, write_json
from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer

C = 3000
SETTINGS = {
    "default": EngineConfig(device="cpu"),
    "minimal": EngineConfig(device="cpu", top_k=(1,), inverse_temperatures=(1.0,)),
}
BACKENDS = ("eager", "compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHUNK_SIZES = (1024, 4096, 16384)


def make_data(rows: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (rows,), generator=gen)
    z = torch.randn(rows, C, generator=gen) * 2.0
    z[torch.arange(rows), labels] += 4.0 * torch.rand(rows, generator=gen)
    return z.to(dtype), labels


def torchmetrics_set(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

    metrics = [
        MulticlassAccuracy(num_classes=C, top_k=1, average="micro"),
        MulticlassAccuracy(num_classes=C, top_k=5, average="micro"),
        MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1"),
    ]
    loss = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for z, y in chunks:
            for m in metrics:
                m.update(z, y)
            loss += F.cross_entropy(z, y, reduction="sum").double()
        values = [float(m.compute()) for m in metrics]
    return float(loss) + sum(values)


def run_threads(threads: int, rows: int, repeat: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The whole table at one thread count: TorchMetrics, then every setting and backend."""
    torch.set_num_threads(threads)
    out_rows: list[dict[str, Any]] = []
    first_chunk: dict[str, float] = {}
    for dname, dtype in DTYPES.items():
        z, y = make_data(rows, dtype)
        nbytes = z.element_size() * C
        reducers: dict[str, ChunkReducer] = {}
        for sname, cfg in SETTINGS.items():
            for backend in BACKENDS:
                reducer = ChunkReducer(C, dataclasses.replace(cfg, backend=backend))
                t0 = time.perf_counter()
                active = reducer.active_backend(dtype)  # compiles here, not inside a timed run
                if backend == "compiled":
                    first_chunk[f"{dname}-{sname}-t{threads}"] = time.perf_counter() - t0
                if active != backend:
                    print(f"warning: {sname}/{backend} runs {active} for {dname}", file=sys.stderr)
                reducers[f"{sname}-{backend}"] = reducer
        for chunk in CHUNK_SIZES:
            chunks = [(z[i : i + chunk], y[i : i + chunk]) for i in range(0, rows, chunk)]
            tm = measure(partial(torchmetrics_set, chunks), repeat=max(1, repeat // 2), warmup=1)
            tm_rate = rows / tm.median
            out_rows.append(_row("torchmetrics", "-", threads, dname, chunk, rows, nbytes, tm, None))
            for name, reducer in reducers.items():

                def run(reducer: ChunkReducer = reducer, chunks: list = chunks) -> list[Records]:
                    return [reducer.reduce(a, b) for a, b in chunks]

                t = measure(run, repeat=repeat, warmup=1)
                sname, backend = name.split("-")
                row = _row(f"engine-{sname}", backend, threads, dname, chunk, rows, nbytes, t, tm_rate)
                out_rows.append(row)
                if chunk == 4096 and backend == "eager":
                    row["record_bytes"] = Records.concat(run()).nbytes_per_sample()
    return out_rows, first_chunk


def metrics_seconds(rows: int, repeat: int) -> dict[str, float]:
    """compute_metrics on ``rows`` merged records (runs once an evaluation)."""
    z, y = make_data(rows, torch.float32)
    out = {}
    for sname, cfg in SETTINGS.items():
        merged = ChunkReducer(C, cfg).reduce(z, y)
        out[sname] = measure(partial(compute_metrics, merged, C, cfg), repeat=repeat).median
    return out


COMPILE_PROBE = """
import time, torch
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.reducer import ChunkReducer
torch.set_num_threads(1)
t0 = time.perf_counter()
assert ChunkReducer(3000, EngineConfig(device="cpu", backend="compiled")).active_backend() == "compiled"
print(time.perf_counter() - t0)
"""


def compile_seconds() -> dict[str, float]:
    """First compiled chunk in a fresh process (float32, default grid, 1 thread): empty cache, warm cache."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="evalstream-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            proc = subprocess.run(
                [sys.executable, "-c", COMPILE_PROBE], env=env, capture_output=True, text=True, check=True
            )
            out[label] = float(proc.stdout.split()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384, help="rows per timed run (default 16384)")
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole table this often; report medians (shared machines)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats, no compile probe (smoke)")
    args = ap.parse_args(argv)
    rows, repeat = (4096, 2) if args.quick else (args.rows, args.repeat)
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    load_before = os.getloadavg()
    rounds: list[list[dict[str, Any]]] = []
    first_chunk: dict[str, float] = {}
    for _ in range(max(1, args.rounds)):
        this_round: list[dict[str, Any]] = []
        for threads in thread_counts:
            r, f = run_threads(threads, rows, repeat)
            this_round += r
            for k, v in f.items():
                first_chunk.setdefault(k, v)  # the first round's: later ones find the kernel compiled
        rounds.append(this_round)
    out_rows = merge_rounds(rounds)
    torch.set_num_threads(thread_counts[0])
    metrics_time = metrics_seconds(rows, repeat)
    compile_time = {} if args.quick else compile_seconds()
    load_after = os.getloadavg()
    cols = [
        "impl",
        "backend",
        "threads",
        "dtype",
        "chunk",
        "samples_per_s",
        "GB_per_s",
        "spread_pct",
        "vs_tm",
    ]
    print(table(out_rows, cols))
    print("compute_metrics seconds for", rows, "records:", {k: round(v, 4) for k, v in metrics_time.items()})
    print("first compiled chunk in this process, seconds:", {k: round(v, 2) for k, v in first_chunk.items()})
    print("compile in a fresh process, seconds:", {k: round(v, 2) for k, v in compile_time.items()})
    print("load average before/after:", load_before, load_after)
    path = write_json(
        "engine",
        {
            "num_classes": C,
            "rows": rows,
            "rounds": len(rounds),
            "settings": {k: repr(v) for k, v in SETTINGS.items()},
            "load_average": {"before": load_before, "after": load_after},
            "results": out_rows,
            "compute_metrics_seconds": metrics_time,
            "first_compiled_chunk_seconds": first_chunk,
            "compile_seconds": compile_time,
            "targets": {
                "vs_torchmetrics_default": 10.0,
                "samples_per_s_float32_default": 300_000,
                "record_bytes": 100,
            },
        },
    )
    print(f"wrote {path}")
    return 0


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per configuration: the median rate over rounds and the median of each round's
    same-run ratio to TorchMetrics; every round's rate is kept."""
    merged = []
    for i, first in enumerate(rounds[0]):
        rows = [r[i] for r in rounds]
        rates = [r["samples_per_s"] for r in rows]
        ratios = [r["vs_tm"] for r in rows]
        rate = statistics.median(rates)
        merged.append(
            {
                **first,
                "samples_per_s": rate,
                "GB_per_s": first["GB_per_s"] * rate / first["samples_per_s"],
                "spread_pct": statistics.median(r["spread_pct"] for r in rows),
                "vs_tm": statistics.median(ratios),
                "rounds": rates,
                "timing": [r["timing"] for r in rows],
            }
        )
    return merged


def _row(
    impl: str,
    backend: str,
    threads: int,
    dtype: str,
    chunk: int,
    rows: int,
    nbytes: int,
    t: Any,
    tm_rate: float | None,
) -> dict:
    rate = rows / t.median
    return {
        "impl": impl,
        "backend": backend,
        "threads": threads,
        "dtype": dtype,
        "chunk": chunk,
        "samples_per_s": rate,
        "GB_per_s": rate * nbytes / 1e9,
        "spread_pct": 100.0 * (t.maximum - t.minimum) / t.median,
        "vs_tm": ratio(rate, tm_rate) if tm_rate else float("nan"),
        "timing": t,
    }


if __name__ == "__main__":
    raise SystemExit(main())
