"""Rank data, the engine's reference result on exactly that data, and an exact comparison.

Fault tests send no sample ids: deduplication by id would hide a chunk counted
twice, so without ids any duplicate (or loss) shows up in the sample count and
in every sum. The reference is ``compute_metrics`` over ``Records.concat`` of
``ChunkReducer.reduce`` of each rank's data, in rank order (the order the
server merges in).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from evalstream.client import EvalClient, RetryPolicy
from evalstream.service.convert import result_from_report
from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.v1 import evaluation_pb2, service_pb2

# Sums must agree to this relative tolerance; counts exactly.
REL_TOL = 1e-12
# Differences below this are rounding in quantities that are ~0 (e.g. overconfidence of a calibrated set).
ABS_TOL = 1e-15
# A restarted server takes a few seconds to import torch and recover; keep retrying well past that.
PATIENT = RetryPolicy(max_attempts=200, initial_backoff_s=0.05, max_backoff_s=0.5)

Batch = tuple[np.ndarray, np.ndarray]


def rank_batches(rank: int, n_batches: int, rows: int, num_classes: int, seed: int) -> list[Batch]:
    """Zipf-imbalanced labels and logits leaning toward them; distinct per (seed, rank)."""
    rng = np.random.default_rng([seed, rank])
    weights = 1.0 / np.arange(1, num_classes + 1)
    out = []
    for _ in range(n_batches):
        labels = rng.choice(num_classes, size=rows, p=weights / weights.sum()).astype(np.int64)
        scores = rng.normal(0.0, 1.0, size=(rows, num_classes)).astype(np.float32)
        scores[np.arange(rows), labels] += rng.normal(2.0, 1.5, size=rows).astype(np.float32)
        out.append((scores, labels))
    return out


def reference(
    ranks: Sequence[Sequence[Batch]], num_classes: int, config: EngineConfig
) -> evaluation_pb2.EvaluationResult:
    """The engine's result on exactly this data: rank-major order, no deduplication by id."""
    reducer = ChunkReducer(num_classes, config)
    parts = [reducer.reduce(scores, labels) for batches in ranks for scores, labels in batches]
    records = Records.concat(parts, inverse_temperatures=config.inverse_temperatures)
    return result_from_report(compute_metrics(records, num_classes, config))


def differences(got: Message, want: Message, path: str = "", rel_tol: float = REL_TOL) -> list[str]:
    """Every field where ``got`` differs from ``want``: integers exactly, floats to ``rel_tol``."""
    out: list[str] = []
    for fd in want.DESCRIPTOR.fields:
        name = f"{path}.{fd.name}" if path else fd.name
        a, b = getattr(got, fd.name), getattr(want, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if set(a) != set(b):
                out.append(f"{name}: keys {sorted(set(a) ^ set(b))} differ")
                continue
            for k in b:
                out += _scalar(f"{name}[{k}]", fd.message_type.fields_by_name["value"], a[k], b[k], rel_tol)
        elif fd.is_repeated:
            if len(a) != len(b):
                out.append(f"{name}: {len(a)} items, expected {len(b)}")
                continue
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    out += differences(x, y, f"{name}[{i}]", rel_tol)
                else:
                    out += _scalar(f"{name}[{i}]", fd, x, y, rel_tol)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            out += differences(a, b, name, rel_tol)
        else:
            out += _scalar(name, fd, a, b, rel_tol)
    return out


def _scalar(name: str, fd: Any, a: object, b: object, rel_tol: float = REL_TOL) -> list[str]:
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        x, y = float(a), float(b)  # type: ignore[arg-type]
        if math.isnan(x) and math.isnan(y):
            return []
        if math.isclose(x, y, rel_tol=rel_tol, abs_tol=ABS_TOL):
            return []
        return [f"{name}: {x!r} != {y!r} (relative {abs(x - y) / max(abs(x), abs(y)):.3g})"]
    return [] if a == b else [f"{name}: {a!r} != {b!r}"]


def assert_same_result(
    got: evaluation_pb2.EvaluationResult, want: evaluation_pb2.EvaluationResult, rel_tol: float = REL_TOL
) -> None:
    """Counts exactly (a lost or doubled chunk changes them), sums to ``rel_tol``."""
    diff = differences(got, want, rel_tol=rel_tol)
    assert not diff, "finalized result differs from the engine on the data sent:\n" + "\n".join(diff[:20])


@dataclass
class RankRun:
    """One rank streamed by the client library on its own thread; ``error`` if it failed."""

    rank: int
    summary: service_pb2.ShardSummary | None = None
    error: BaseException | None = None
    reconnects: int = 0
    replayed: int = 0
    thread: threading.Thread | None = field(default=None, repr=False)


def stream_rank(
    target: str,
    run: RankRun,
    *,
    model: str,
    world_size: int,
    batches: Sequence[Batch],
    num_classes: int,
    pace_s: float = 0.0,
    step: int = 0,
    retry: RetryPolicy = PATIENT,
    chunk_bytes: int = 1 << 20,
    max_inflight_chunks: int = 32,
) -> None:
    """Open the rank's shard, add every batch (``pace_s`` apart), close; record what happened."""
    try:
        with EvalClient(target, retry=retry) as client:
            ev = client.evaluation(
                run="faults",
                model=model,
                step=step,
                num_classes=num_classes,
                rank=run.rank,
                world_size=world_size,
                chunk_bytes=chunk_bytes,
                max_inflight_chunks=max_inflight_chunks,
                open_timeout=300,
            )
            for scores, labels in batches:
                ev.add(scores, labels)
                if pace_s:
                    time.sleep(pace_s)
            run.summary = ev.close(timeout=300)
            run.reconnects = ev.stats.reconnects
            run.replayed = ev.stats.replayed_chunks
    except BaseException as exc:
        run.error = exc


def start_ranks(
    target: str,
    ranks: Sequence[Sequence[Batch]],
    world_size: int | None = None,
    first_rank: int = 0,
    **kwargs: object,
) -> list[RankRun]:
    """Stream ranks first_rank, first_rank+1, ... concurrently (one thread and one client each, like
    one process per rank); ``world_size`` defaults to ``len(ranks)`` (more when others stream elsewhere)."""
    runs = [RankRun(first_rank + i) for i in range(len(ranks))]
    for run, batches in zip(runs, ranks, strict=True):
        run.thread = threading.Thread(
            target=stream_rank,
            args=(target, run),
            kwargs={"world_size": world_size or len(ranks), "batches": batches, **kwargs},
            daemon=True,
        )
        run.thread.start()
    return runs


def join_ranks(runs: Sequence[RankRun], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    for run in runs:
        assert run.thread is not None
        run.thread.join(max(0.0, deadline - time.monotonic()))
        assert not run.thread.is_alive(), f"rank {run.rank} still streaming after {timeout} s"
        if run.error is not None:
            raise AssertionError(f"rank {run.rank} failed: {run.error!r}") from run.error


def running(runs: Sequence[RankRun]) -> bool:
    return any(r.thread is not None and r.thread.is_alive() for r in runs)


def fetch_result(target: str, model: str, step: int = 0) -> evaluation_pb2.Evaluation:
    """The finalized evaluation (waits for it), with per-class counts so they are compared too."""
    with EvalClient(target, retry=PATIENT) as client:
        client.wait_for("faults", model, step=step, timeout=120)
        return client.get("faults", model, step=step, include_per_class=True)
