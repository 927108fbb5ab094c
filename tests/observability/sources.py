"""Small in-memory implementations of the exporter's two source Protocols.

They hold real ``EvaluationResult`` messages and ``ShardProgress`` records, the
same types the SQLite store and the ingest coordinator hand to the collector.
"""

from __future__ import annotations

from collections.abc import Iterable

from evalstream.service.status import FinalizedView, SeriesKey, ShardProgress
from evalstream.v1 import evaluation_pb2


def make_result(
    nll: float = 1.25,
    top1: float = 0.6,
    num_samples: int = 1000,
    num_classes: int = 3000,
    num_bins: int = 5,
) -> evaluation_pb2.EvaluationResult:
    """A result whose calibration bins and headline metrics are consistent with each other."""
    result = evaluation_pb2.EvaluationResult(num_samples=num_samples, num_classes=num_classes)
    result.metrics["nll"] = nll
    result.metrics["accuracy_top1"] = top1
    result.metrics["accuracy_top5"] = min(1.0, top1 + 0.2)
    result.metrics["ece"] = 0.05
    result.metrics["brier"] = 0.55
    result.metrics["best_temperature"] = 1.4
    result.metrics["accuracy_tail"] = top1 / 2
    result.calibration.num_bins = num_bins
    per_bin = num_samples // num_bins
    for i in range(num_bins):
        lo, hi = i / num_bins, (i + 1) / num_bins
        count = 0 if i == 0 else per_bin  # the lowest bin is empty: no accuracy is exported for it
        result.calibration.bins.add(
            lower=lo, upper=hi, count=count, mean_confidence=(lo + hi) / 2, accuracy=max(0.0, lo + 0.05)
        )
    return result


class MemoryFinalized:
    """FinalizedSource over a dict: the latest view per key."""

    def __init__(self) -> None:
        self.views: dict[SeriesKey, FinalizedView] = {}
        self.fail = False

    def put(self, view: FinalizedView) -> None:
        self.views[view.key] = view

    def latest_finalized(self) -> Iterable[FinalizedView]:
        if self.fail:
            raise OSError("database is locked")
        return sorted(self.views.values(), key=lambda v: -v.finalized_at)


class MemoryProgress:
    """ProgressSource over a list of shard records."""

    def __init__(self, shards: Iterable[ShardProgress] = ()) -> None:
        self.shards = list(shards)

    def open_progress(self) -> Iterable[ShardProgress]:
        return list(self.shards)
