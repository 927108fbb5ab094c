"""The benchmark harness: repeat a callable, median and spread, ratios, JSON results, a short table.

Medians resist the noise of a shared machine; the spread (min, max and the
interquartile range) says how much to trust them. Every result file records
the machine and thread settings it was measured under.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    """Seconds per call over ``repeat`` timed calls (after ``warmup`` untimed ones)."""

    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    repeat: int
    samples: list[float]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def measure(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn`` warmup + repeat times; time the last ``repeat`` calls with perf_counter."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    ordered = sorted(samples)
    if repeat >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, repeat, samples)


def ratio(a: float, b: float) -> float:
    """a / b, or NaN where b is 0 (JSON writes it as NaN, the table as '-')."""
    return a / b if b else float("nan")


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return env


def write_json(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write bench/results/<name>.json with the environment added; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    body = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj: object) -> object:
    if isinstance(obj, Timing):
        return asdict(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of ``columns`` from each row dict."""
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
