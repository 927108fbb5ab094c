"""Client cost on the training loop: one ``add()`` of a [4096, 3000] batch vs the TorchMetrics update.

What a user would do instead of evalstream is update TorchMetrics in-process:
top-1 and top-5 accuracy, calibration error (15 bins) and mean cross-entropy.
One loop does both on every batch, as a validation loop would: ``add()`` the
batch to a real stream (the server runs in another process), then update the
metrics; each is timed on its own, so the ratio is measured in the same run
under the same load (the stream's sender thread runs during both).

Run: ``python -m bench.client_cost [--batches 12] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.common import ServerProcess, table, write_json
from bench.e2e import BATCH, C, make_batches


def _metrics() -> tuple[list[Any], Any]:
    import torch
    import torchmetrics
    from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

    metrics = [
        MulticlassAccuracy(num_classes=C, top_k=1),
        MulticlassAccuracy(num_classes=C, top_k=5),
        MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1"),
    ]
    ce = torchmetrics.MeanMetric()

    def update(scores: torch.Tensor, labels: torch.Tensor) -> None:
        for m in metrics:
            m.update(scores, labels)
        ce.update(torch.nn.functional.cross_entropy(scores.float(), labels, reduction="none"))

    return [*metrics, ce], update


def run(batches: int, dtype: str, warmup: int = 2) -> dict[str, Any]:
    import torch

    from evalstream.client import EvalClient

    data = make_batches(dtype)
    _, update = _metrics()
    add_s: list[float] = []
    update_s: list[float] = []
    with ServerProcess() as server, EvalClient(server.target) as client:
        with client.evaluation(run="bench-client-cost", model=dtype, num_classes=C) as stream:
            for i in range(warmup + batches):
                scores, labels = data[i % len(data)]
                ids = torch.arange(i * BATCH, (i + 1) * BATCH)
                t0 = time.perf_counter()
                stream.add(scores, labels, sample_ids=ids)
                t1 = time.perf_counter()
                with torch.no_grad():
                    update(scores, labels)
                t2 = time.perf_counter()
                if i >= warmup:
                    add_s.append(t1 - t0)
                    update_s.append(t2 - t1)
        waits = stream.stats.backpressure_waits
    add_ms = statistics.median(add_s) * 1e3
    update_ms = statistics.median(update_s) * 1e3
    row = {
        "dtype": dtype,
        "batch": f"[{BATCH}, {C}]",
        "add() ms": add_ms,
        "add min": min(add_s) * 1e3,
        "add max": max(add_s) * 1e3,
        "torchmetrics ms": update_ms,
        "tm min": min(update_s) * 1e3,
        "tm max": max(update_s) * 1e3,
        "add / torchmetrics": add_ms / update_ms,
        "backpressure waits": waits,
        "torch threads": torch.get_num_threads(),
    }
    return {"batches": batches, "rows": [row], "add_seconds": add_s, "torchmetrics_seconds": update_s}


COLUMNS = ["dtype", "batch", "add() ms", "add min", "add max", "torchmetrics ms", "tm min", "tm max"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    results = [run(args.batches, dtype) for dtype in args.dtypes.split(",")]
    rows = [r["rows"][0] for r in results]
    print(table(rows, [*COLUMNS, "add / torchmetrics", "backpressure waits"]))
    out = {"batches": args.batches, "rows": rows, "runs": results}
    write_json("client_cost", out)
    return out


if __name__ == "__main__":
    main()
