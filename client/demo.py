"""The demo: stream a synthetic 3,000-class, Zipf-imbalanced validation set for three models
from two ranks each, let the service compute everything, and show why loss and accuracy disagree.

Every number printed comes from the server (engine and CompareModels); the
generator in ``synthetic.py`` only decides how each synthetic model behaves.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict

from evalstream.client.client import EvalClient
from evalstream.client.render import ProgressBar, table
from evalstream.client.stream import EvaluationStream
from evalstream.client.synthetic import SyntheticValidationSet
from evalstream.v1 import evaluation_pb2, service_pb2


@dataclass(frozen=True)
class DemoConfig:
    """Size and shape of the demo; the defaults stream 3 x 30,000 samples of 3,000 classes."""

    num_samples: int = 30_000
    num_classes: int = 3_000
    seed: int = 0
    world_size: int = 2
    batch_size: int = 1024
    zipf_exponent: float = 1.0
    run: str = ""
    result_timeout_s: float = 300.0
    # Where each rank's scores are reduced: "server", "client", "auto", or "mixed" (even ranks
    # reduce on the client and send records, odd ranks send logits: both modes in one evaluation).
    reduce: str = "mixed"

    def rank_mode(self, rank: int) -> str:
        if self.reduce == "mixed":
            return "client" if rank % 2 == 0 else "server"
        return self.reduce


@dataclass
class DemoResult:
    run: str
    config: DemoConfig
    descriptions: dict[str, str]
    evaluations: dict[str, evaluation_pb2.Evaluation]
    comparison: service_pb2.CompareModelsResponse
    samples: int
    seconds: float
    label_stats: dict[str, Any] = field(default_factory=dict)


class _Streams:
    """The open/closed streams of the demo, for the progress bar."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[EvaluationStream] = []

    def add(self, stream: EvaluationStream) -> None:
        with self._lock:
            self._streams.append(stream)

    def committed(self) -> int:
        with self._lock:
            return sum(s.samples_committed for s in self._streams)


def _stream_rank(
    client: EvalClient,
    data: SyntheticValidationSet,
    variant: str,
    run: str,
    rank: int,
    config: DemoConfig,
    streams: _Streams,
) -> evaluation_pb2.Evaluation | None:
    """One rank of one model: stream its batches, close; rank 0 waits for the merged result."""
    ev = client.evaluation(
        run=run,
        model=variant,
        num_classes=data.num_classes,
        rank=rank,
        world_size=config.world_size,
        dataset_size=data.num_samples,
        reduce=config.rank_mode(rank),  # type: ignore[arg-type]
    )
    streams.add(ev)
    with ev:
        for logits, labels, ids in data.batches(variant, config.batch_size, rank, config.world_size):
            ev.add(logits, labels, sample_ids=ids)
    return ev.result(timeout=config.result_timeout_s) if rank == 0 else None


def run_demo(client: EvalClient, config: DemoConfig, progress: bool = True) -> DemoResult:
    """Stream every variant from ``world_size`` concurrent ranks, then compare them on the server."""
    run = config.run or time.strftime("demo-%Y%m%d-%H%M%S")
    data = SyntheticValidationSet(
        num_samples=config.num_samples,
        num_classes=config.num_classes,
        seed=config.seed,
        zipf_exponent=config.zipf_exponent,
    )
    variants = list(data.variants)
    total = config.num_samples * len(variants)
    bar = ProgressBar(total, label="streaming") if progress else None
    streams = _Streams()
    evaluations: dict[str, evaluation_pb2.Evaluation] = {}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=config.world_size, thread_name_prefix="demo-rank") as pool:
        for variant in variants:
            futures: list[Future[evaluation_pb2.Evaluation | None]] = [
                pool.submit(_stream_rank, client, data, variant, run, rank, config, streams)
                for rank in range(config.world_size)
            ]
            while not all(f.done() for f in futures):
                if bar is not None:
                    bar.update(streams.committed())
                time.sleep(0.05)
            result = futures[0].result()
            for f in futures[1:]:
                f.result()
            assert result is not None
            evaluations[variant] = result
    seconds = time.monotonic() - started
    if bar is not None:
        bar.close(streams.committed())
    comparison = client.compare(run, variants, seed=config.seed)
    return DemoResult(
        run=run,
        config=config,
        descriptions={name: v.description for name, v in data.variants.items()},
        evaluations=evaluations,
        comparison=comparison,
        samples=streams.committed(),
        seconds=seconds,
        label_stats=_label_stats(data),
    )


def _label_stats(data: SyntheticValidationSet) -> dict[str, Any]:
    counts = [0] * data.num_classes
    for y in data.labels.tolist():
        counts[y] += 1
    ordered = sorted(counts, reverse=True)
    return {
        "classes_present": sum(1 for c in counts if c),
        "largest_class_share": ordered[0] / data.num_samples,
        "top_10_classes_share": sum(ordered[:10]) / data.num_samples,
    }


def _modes(config: DemoConfig) -> str:
    """Which ranks reduced where, for the report."""
    names = {"client": "records reduced on the client", "server": "logits reduced on the server"}
    parts = [
        f"rank {r}: {names.get(config.rank_mode(r), config.rank_mode(r))}" for r in range(config.world_size)
    ]
    return "; ".join(parts)


def render_demo(result: DemoResult, comparison_text: str) -> str:
    """The terminal report: what was streamed, a per-model table, then the comparison."""
    c, s = result.config, result.label_stats
    intro = (
        f"run {result.run}: {c.num_samples:,} validation samples x {len(result.evaluations)} models, "
        f"{c.num_classes:,} classes (Zipf {c.zipf_exponent:g}: the largest class holds "
        f"{s['largest_class_share']:.1%} of the labels, {s['classes_present']:,} classes appear), "
        f"{c.world_size} ranks per model ({_modes(c)})\n"
        f"streamed {result.samples:,} samples in {result.seconds:.1f} s "
        f"({result.samples / max(result.seconds, 1e-9):,.0f} samples/s end to end, metrics included)"
    )
    rows: list[list[object]] = []
    for name, e in result.evaluations.items():
        m = e.result.metrics
        rows.append(
            [
                name,
                m["nll"],
                m["accuracy_top1"],
                m.get("accuracy_top5", float("nan")),
                m["ece"],
                m["overconfidence"],
                m["best_temperature"],
                m["calibrated_nll"],
                m["accuracy_tail"],
            ]
        )
    headers = ["model", "nll", "acc@1", "acc@5", "ece", "overconf", "best T", "nll@T", "acc tail"]
    models = "Models (computed by the service)\n" + table(headers, rows)
    legend = "\n".join(f"  {name}: {text}" for name, text in result.descriptions.items())
    return "\n\n".join([intro, models, "What each synthetic model does\n" + legend, comparison_text])


def demo_json(result: DemoResult) -> dict[str, Any]:
    """Everything the demo showed, machine-readable (protobuf messages in their JSON mapping)."""
    return {
        "run": result.run,
        "config": asdict(result.config),
        "labels": result.label_stats,
        "streamed": {"samples": result.samples, "seconds": result.seconds},
        "models": {
            name: {
                "description": result.descriptions[name],
                "evaluation": MessageToDict(e, preserving_proto_field_name=True),
            }
            for name, e in result.evaluations.items()
        },
        "comparison": MessageToDict(result.comparison, preserving_proto_field_name=True),
    }
