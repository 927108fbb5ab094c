"""Read-only views the exporter takes from ingest and the store.

Small interfaces so the Prometheus collector depends on neither the SQLite
store nor the ingest internals, and reads current state at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from evalstream.service.store.base import EvaluationRow
from evalstream.v1 import evaluation_pb2


@dataclass(frozen=True)
class SeriesKey:
    """The (run, model, split) a Prometheus series is labelled with."""

    run: str
    model: str
    split: str


@dataclass(frozen=True)
class FinalizedView:
    """The latest finalized evaluation of one (run, model, split)."""

    key: SeriesKey
    step: int
    finalized_at: float  # unix seconds
    result: evaluation_pb2.EvaluationResult


@dataclass(frozen=True)
class ShardProgress:
    """Live progress of one rank of an open evaluation."""

    key: SeriesKey
    step: int
    rank: int
    world_size: int
    ranks_closed: int
    samples: int
    # Running sums over committed chunks, for running loss / accuracy.
    nll_sum: float
    correct: int
    updated_at: float  # unix seconds


class FinalizedSource(Protocol):
    def latest_finalized(self) -> Iterable[FinalizedView]:
        """The latest finalized evaluation per (run, model, split), newest first."""
        ...


class ProgressSource(Protocol):
    def open_progress(self) -> Iterable[ShardProgress]:
        """One entry per shard of every evaluation not yet finalized."""
        ...


class FinalizedRows(Protocol):
    def latest_finalized(self) -> list[EvaluationRow]:
        """The store's latest finalized evaluation per (run, model, split), newest first."""
        ...


class StoreFinalized:
    """FinalizedSource over a store: its rows' stored results read as ``EvaluationResult``.

    The store keeps a result as opaque bytes; parsing them (without the per-class
    arrays the exporter does not read) is the service's job, so it happens here.
    """

    def __init__(self, store: FinalizedRows) -> None:
        self._store = store

    def latest_finalized(self) -> list[FinalizedView]:
        views = []
        for row in self._store.latest_finalized():
            result = evaluation_pb2.EvaluationResult.FromString(row.result or b"")
            result.imbalance.ClearField("per_class")
            key = SeriesKey(row.key.run, row.key.model, row.key.split)
            views.append(FinalizedView(key, row.key.step, row.finalized_at or 0.0, result))
        return views
