"""The finalize sweep: every replica finishes the finalizes another replica started and never committed.

Why: with several replicas, the one whose close completed an evaluation holds the
claim to finalize it (``service/store/postgres_claims.py``). If it dies or stalls,
its claim expires and the evaluation would stay open with every rank closed. Each
replica therefore asks its store, every few seconds, to claim such evaluations
(``claim_pending``) and finalizes what it got, through the same path a close
takes, so the result is computed from the same committed chunks and committed
once. A store without claims (the embedded SQLite one: one process, whose
``recover()`` at start already finishes interrupted finalizes) has no sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class ClaimingStore(Protocol):
    """A store shared by replicas: it hands out the completed evaluations nobody is finalizing."""

    def claim_pending(self) -> list[str]: ...


class FinalizeSweeper:
    """Claims completed, unclaimed evaluations every ``interval_s`` and finalizes them."""

    def __init__(
        self,
        store: ClaimingStore,
        finalize: Callable[[str], Awaitable[object]],
        interval_s: float,
    ) -> None:
        self._store = store
        self._finalize = finalize
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> list[str]:
        """One sweep: the ids it finalized (or found finalized meanwhile)."""
        loop = asyncio.get_running_loop()
        claimed = await loop.run_in_executor(None, self._store.claim_pending)
        done = []
        for evaluation_id in claimed:
            try:
                await self._finalize(evaluation_id)
                done.append(evaluation_id)
            except Exception as exc:  # one bad evaluation must not stop the sweep of the others
                log.warning("could not finalize %s taken over from another replica: %s", evaluation_id, exc)
        if done:
            log.info("finalized %d evaluation(s) whose finalizer went away", len(done))
        return done

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception:
                log.warning("finalize sweep failed; retrying in %.1f s", self.interval_s, exc_info=True)
