"""The finalizer: an evaluation's committed records merged into its result, exactly once.

When every rank has closed (or on FinalizeEvaluation) the shards' records are
concatenated, deduplicated by sample id, ``compute_metrics`` runs, and the
result and the merged records replace the chunk rows in one store transaction.
One finalize per evaluation runs at a time (a per-evaluation lock); a second
caller gets the stored row. The work runs to its end even if the caller is
cancelled (a dropped connection must not leave every rank closed and the
evaluation open). Once the result is committed, the evaluation's waiters on this
server are woken (``announce``, ``finalizations.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from evalstream.service.convert import result_from_report
from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.errors import FailedPrecondition, NotFound
from evalstream.service.store.base import EvaluationKey, EvaluationRow, Store
from evalstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)


class Finalizer:
    """Finalizes the evaluations of one server."""

    def __init__(
        self,
        store: Store,
        config: EngineConfig,
        telemetry: Telemetry,
        in_io: Callable[..., Awaitable[Any]],
        in_worker: Callable[..., Awaitable[Any]],
        track: Callable[[asyncio.Future[Any]], asyncio.Future[Any]],
        announce: Callable[[str], None] = lambda evaluation_id: None,
    ) -> None:
        self._store = store
        self._config = config
        self._telemetry = telemetry
        self._in_io = in_io
        self._in_worker = in_worker
        self._track = track
        self._announce = announce
        self._locks: dict[str, asyncio.Lock] = {}

    async def finalize_key(self, key: EvaluationKey) -> EvaluationRow:
        """FinalizeEvaluation: merge whatever every rank committed so far."""
        row: EvaluationRow | None = await self._in_io(
            self._store.find, key.run, key.model, key.split, key.step
        )
        if row is None:
            raise NotFound(f"no evaluation {key.name}; open a shard first")
        return await self.finalize(row.evaluation_id)

    async def finalize(self, evaluation_id: str) -> EvaluationRow:
        lock = self._locks.setdefault(evaluation_id, asyncio.Lock())
        async with lock:
            row: EvaluationRow | None = await self._in_io(self._store.get, evaluation_id)
            if row is None:
                raise NotFound(f"no evaluation with id {evaluation_id!r}")
            if row.finalized:
                return row
            work = self._track(asyncio.ensure_future(self._finalize(row)))
            out: EvaluationRow = await asyncio.shield(work)
        self._locks.pop(evaluation_id, None)
        return out

    async def _finalize(self, row: EvaluationRow) -> EvaluationRow:
        started = time.perf_counter()
        result, merged, num_samples = await self._in_worker(self._merge, row)
        finalized: EvaluationRow = await self._in_io(
            self._store.finalize, row.evaluation_id, result, merged, num_samples
        )
        if not finalized.finalized:  # another replica's claim: it finalizes, and announces it
            return finalized
        self._announce(row.evaluation_id)
        self._telemetry.finalized.inc()
        self._telemetry.finalize_seconds.observe(time.perf_counter() - started)
        log.info("finalized %s (%d samples)", row.key.name, num_samples)
        return finalized

    def _merge(self, row: EvaluationRow) -> tuple[bytes, bytes, int]:
        """On a worker thread: the result (serialized EvaluationResult), merged records, samples."""
        # The chunk blobs are freed once concatenated: finalize holds the records about twice, not thrice.
        records = Records.concat(
            (Records.from_bytes(b) for b in self._store.chunk_records(row.evaluation_id)),
            inverse_temperatures=self._config.inverse_temperatures,
        )
        if len(records) == 0:
            raise FailedPrecondition(f"{row.key.name} has no committed samples; nothing to finalize")
        # Deduplicated once: the metrics and the stored records are the same kept samples.
        kept, dropped = records.dedupe()
        del records
        report = compute_metrics(kept, row.num_classes, self._config, dedupe=False)
        report = replace(report, duplicates_dropped=dropped)
        return result_from_report(report).SerializeToString(), kept.to_bytes(), report.num_samples
