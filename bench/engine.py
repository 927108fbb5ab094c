"""Engine throughput at C=3,000: ChunkReducer against a TorchMetrics set on the same data, same run.

Engine: ``ChunkReducer.reduce`` over every chunk (records out), default settings
(top-1/5, 15 bins, the 10-point temperature grid) and minimal settings (no
temperature grid). TorchMetrics set: ``MulticlassAccuracy`` top-1 and top-5,
``MulticlassCalibrationError`` (15 bins, L1) and ``F.cross_entropy``, updated
chunk by chunk and computed at the end. ``compute_metrics`` on the merged
records is timed separately (it runs once per evaluation, not per chunk).

    .venv/bin/python -m bench.engine [--rows N] [--threads T] [--quick]
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer

from .common import measure, ratio, table, write_json

C = 3000
SETTINGS = {
    "default": EngineConfig(device="cpu"),
    "minimal": EngineConfig(device="cpu", top_k=(1,), inverse_temperatures=(1.0,)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32768, help="rows per timed run (default 32768)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats (smoke run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, repeat = (8192, 2) if args.quick else (args.rows, args.repeat)
    chunk_sizes = (1024, 4096, 16384)
    out_rows: list[dict[str, Any]] = []
    metrics_time: dict[str, float] = {}
    for dname, dtype in DTYPES.items():
        z, y = make_data(rows, dtype)
        nbytes = z.element_size() * C
        tm_rate: dict[int, float] = {}
        for chunk in chunk_sizes:
            chunks = [(z[i : i + chunk], y[i : i + chunk]) for i in range(0, rows, chunk)]
            tm = measure(partial(torchmetrics_set, chunks), repeat=max(1, repeat // 2), warmup=1)
            tm_rate[chunk] = rows / tm.median
            out_rows.append(_row("torchmetrics", dname, chunk, rows, nbytes, tm, None))
            for sname, cfg in SETTINGS.items():
                reducer = ChunkReducer(C, cfg)

                def run(reducer: ChunkReducer = reducer, chunks: list = chunks) -> list[Records]:
                    return [reducer.reduce(a, b) for a, b in chunks]

                t = measure(run, repeat=repeat, warmup=1)
                out_rows.append(_row(f"engine-{sname}", dname, chunk, rows, nbytes, t, tm_rate[chunk]))
                if chunk == 4096:
                    merged = Records.concat(run())
                    mt = measure(partial(compute_metrics, merged, C, cfg), repeat=repeat)
                    metrics_time[f"{dname}-{sname}"] = mt.median
                    out_rows[-1]["record_bytes"] = merged.nbytes_per_sample()
    print(table(out_rows, ["impl", "dtype", "chunk", "samples_per_s", "GB_per_s", "spread_pct", "vs_tm"]))
    print("compute_metrics seconds for", rows, "records:", {k: round(v, 4) for k, v in metrics_time.items()})
    path = write_json(
        "engine",
        {
            "num_classes": C,
            "rows": rows,
            "settings": {k: repr(v) for k, v in SETTINGS.items()},
            "results": out_rows,
            "compute_metrics_seconds": metrics_time,
            "targets": {
                "vs_torchmetrics_default": 10.0,
                "samples_per_s_float32_default": 300_000,
                "record_bytes": 100,
            },
        },
    )
    print(f"wrote {path}")
    return 0


def _row(impl: str, dtype: str, chunk: int, rows: int, nbytes: int, t: Any, tm_rate: float | None) -> dict:
    rate = rows / t.median
    return {
        "impl": impl,
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
