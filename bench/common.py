"""The benchmark harness: repeat a callable, median and spread, ratios, JSON results, a short table,
and the server in its own process that the end-to-end benchmarks stream into.

Medians resist the noise of a shared machine; the spread (min, max and the
interquartile range) says how much to trust them. Every result file records
the machine and thread settings it was measured under.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

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


def _proc_status_bytes(pid: int, key: str) -> int:
    """A memory line (``VmRSS``, ``VmHWM``) of a live process's /proc status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def rss_bytes(pid: int) -> int:
    """VmRSS (resident set now) of a live process."""
    return _proc_status_bytes(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident set) of a live process."""
    return _proc_status_bytes(pid, "VmHWM")


def _serve(data_dir: str, overrides: dict[str, Any], ready: Any, stop: Any) -> None:
    """Child process: the real server with default settings, until ``stop`` is set."""
    from evalstream.service.server import BackgroundServer
    from evalstream.service.settings import Settings

    settings = Settings.load(
        env={},
        data_dir=data_dir,
        grpc_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        device="cpu",
        **overrides,
    )
    with BackgroundServer(settings) as server:
        ready.put((server.target, server.metrics_target))
        stop.wait()


class ServerProcess:
    """The evalstream server in its own process, on loopback, with a throwaway data directory."""

    def __init__(self, **overrides: Any) -> None:
        self._ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="evalstream-bench-")
        self.data_dir = Path(self._tmp.name)
        self._stop = self._ctx.Event()
        ready = self._ctx.Queue()
        self.process = self._ctx.Process(
            target=_serve, args=(str(self.data_dir), overrides, ready, self._stop), daemon=True
        )
        self.process.start()
        self.target, self.metrics_target = ready.get(timeout=120)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.pid)

    def metric(self, name: str) -> float:
        """One sample of the server's own Prometheus metrics (e.g. the engine's total seconds)."""
        with urllib.request.urlopen(f"http://{self.metrics_target}/metrics", timeout=10) as reply:
            for family in text_string_to_metric_families(reply.read().decode()):
                for sample in family.samples:
                    if sample.name == name and not sample.labels:
                        return float(sample.value)
        raise KeyError(name)

    def close(self) -> None:
        self._stop.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
