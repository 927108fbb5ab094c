"""Evaluation gauges from one replica only, when several share a store.

The exporter (``service/exporter.py``) reads the finalized evaluations and the
progress of open ones from the store at scrape time. With replicas on one
PostgreSQL, each would read the same rows; ``ExportGate`` hands the exporter the
store's views only on the replica that holds the exporter lease
(``service/store/postgres_leader.py``) and nothing on the others, so every
evaluation appears once in Prometheus whichever replica a scrape reaches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from evalstream.service.status import FinalizedSource, FinalizedView, ProgressSource, ShardProgress


@runtime_checkable
class ExportingStore(Protocol):
    """A store shared by replicas that elects the one exporting evaluation gauges."""

    def exports_evaluations(self) -> bool: ...


class ExportGate:
    """A FinalizedSource and ProgressSource that are empty unless this replica is the exporter."""

    def __init__(self, store: ExportingStore, finalized: FinalizedSource, progress: ProgressSource) -> None:
        self._store = store
        self._finalized = finalized
        self._progress = progress
        self._exporting = False

    def latest_finalized(self) -> Iterable[FinalizedView]:
        # Asked first on every scrape: the answer holds for the progress read that follows.
        self._exporting = self._store.exports_evaluations()
        return self._finalized.latest_finalized() if self._exporting else []

    def open_progress(self) -> Iterable[ShardProgress]:
        return self._progress.open_progress() if self._exporting else []
