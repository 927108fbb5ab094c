"""Finalizations announced to the calls waiting for them (a GetEvaluation with ``wait``).

Why: a job's rank 0 calls ``result()`` on whichever server its channel reached, while the
last close may finalize the evaluation anywhere: on this server, or, with replicas sharing
PostgreSQL, on another one. Rather than every waiter polling the store, a waiter sleeps
until a finalization of its evaluation is announced, from one of two sources:

- this server's finalizer, once the result is committed (both backends: ``finalizer.py``);
- where other processes finalize too (replicas), the store's listener
  (``store/postgres_listen.py``): one connection per replica on PostgreSQL's
  ``LISTEN evalstream_finalized``, relaying the one NOTIFY each finalize commits.

A notification sent while the listener is disconnected is lost, so while it is not connected
one poll task checks every waited-for evaluation in the store every ``poll_s`` (one store call
for all waiters, not one per waiter), and whenever the listener's state changes (dropped,
connected again) every waiter is checked once: a finalization missed meanwhile strands nobody.

How a wait ended is counted by outcome: ``notified`` (an announcement woke it), ``polled``
(a store check found it finalized: the fallback polling, or the check after a listener state
change) or ``timeout`` (the wait elapsed, or the server is shutting down).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from evalstream.service.store.base import Store
from evalstream.service.telemetry import WAIT_OUTCOMES, Telemetry

log = logging.getLogger(__name__)

NOTIFIED, POLLED, TIMEOUT = WAIT_OUTCOMES
# How often waiters' evaluations are checked in the store while no listener is connected.
DEFAULT_POLL_S = 0.5

# ids -> those of them finalized in the store (run off the event loop by the caller's executor).
CheckFinalized = Callable[[Sequence[str]], Awaitable[set[str]]]


def finalized_in(store: Store, ids: Sequence[str]) -> set[str]:
    """Those of ``ids`` the store holds finalized: one blocking call for a whole poll round."""
    return {i for i in ids if (row := store.get(i)) is not None and row.finalized}


class Wait:
    """One waiter, registered before its caller's last look at the store (see ``Waiters.watch``)."""

    def __init__(self, waiters: Waiters, evaluation_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.evaluation_id = evaluation_id
        self._waiters = waiters
        self._loop = loop
        self._event = asyncio.Event()
        self.outcome: str | None = None

    def wake(self, outcome: str) -> None:
        """From any thread: end the wait with ``outcome`` (the first one given counts)."""
        self._loop.call_soon_threadsafe(self._set, outcome)

    def _set(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self._event.set()

    async def wait(self, timeout_s: float) -> str:
        """Sleep until announced, found finalized, or ``timeout_s``; the outcome (counted)."""
        if not self._waiters.closed:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout_s)
        outcome = self.outcome if self.outcome in (NOTIFIED, POLLED) else TIMEOUT
        self._waiters.count(outcome)
        return outcome


class Waiters:
    """The waiters of one server, by evaluation id; ``announce`` and ``listening`` are thread-safe."""

    def __init__(self, check: CheckFinalized, telemetry: Telemetry, poll_s: float = DEFAULT_POLL_S) -> None:
        self._check = check
        self._telemetry = telemetry
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._waits: dict[str, set[Wait]] = {}
        # None until the server knows: a listener connected (True) or not (False), or none needed.
        self._listening: bool | None = None
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recheck: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """On the server's event loop: start the poll task (idle while the listener is connected)."""
        self._loop = asyncio.get_running_loop()
        self._recheck = asyncio.Event()
        self._task = asyncio.ensure_future(self._poll())

    async def close(self) -> None:
        """Shutting down: every wait ends now (outcome timeout) and new ones end at once."""
        self.closed = True
        for wait in self._all():
            wait.wake(TIMEOUT)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def count(self, outcome: str) -> None:
        self._telemetry.waits.labels(outcome=outcome).inc()

    @contextmanager
    def watch(self, evaluation_id: str) -> Iterator[Wait]:
        """Register a waiter for ``evaluation_id`` for the block's duration.

        The caller looks at the store *inside* the block before waiting: a finalization
        committed between its first read and the registration is then seen by that look.
        """
        wait = Wait(self, evaluation_id, asyncio.get_running_loop())
        with self._lock:
            self._waits.setdefault(evaluation_id, set()).add(wait)
        self._telemetry.waiting.inc()
        try:
            yield wait
        finally:
            self._telemetry.waiting.dec()
            with self._lock:
                waits = self._waits.get(evaluation_id)
                if waits is not None:
                    waits.discard(wait)
                    if not waits:
                        del self._waits[evaluation_id]

    def announce(self, evaluation_id: str) -> None:
        """From any thread: ``evaluation_id`` was finalized (committed); wake its waiters."""
        with self._lock:
            waits = list(self._waits.get(evaluation_id, ()))
        for wait in waits:
            wait.wake(NOTIFIED)

    def listening(self, connected: bool) -> None:
        """From any thread: the listener connected or lost its connection.

        Either way every waiter is checked in the store once (a notification may have been
        missed while it was away); while it is away, the poll task checks every ``poll_s``.
        """
        with self._lock:
            before, self._listening = self._listening, connected
        if connected and before is not True:
            log.info("finalization listener connected: waiters are woken by notifications")
        elif before and not connected:
            log.warning(
                "finalization listener disconnected: waiters poll the store every %s s until it reconnects",
                self.poll_s,
            )
        loop, recheck = self._loop, self._recheck
        if loop is not None and recheck is not None and not loop.is_closed():
            loop.call_soon_threadsafe(recheck.set)

    def in_process_only(self) -> None:
        """The store has no listener: only this process finalizes, so its announcements are all."""
        with self._lock:
            self._listening = True

    @property
    def is_listening(self) -> bool:
        """Whether announcements are complete now (else the poll task checks every ``poll_s``)."""
        with self._lock:
            return bool(self._listening)

    def waiting(self) -> int:
        """Calls waiting now (for tests and logs)."""
        with self._lock:
            return sum(len(w) for w in self._waits.values())

    def _all(self) -> list[Wait]:
        with self._lock:
            return [w for waits in self._waits.values() for w in waits]

    async def _poll(self) -> None:
        recheck = self._recheck
        assert recheck is not None
        while True:
            if self.is_listening:
                await recheck.wait()
            else:
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(recheck.wait(), self.poll_s)
            recheck.clear()
            with self._lock:
                ids = list(self._waits)
            if not ids:
                continue
            try:
                finalized = await self._check(ids)
            except Exception as exc:  # the store is away too: the next round tries again
                log.debug("waiters' store check failed: %s", exc)
                continue
            with self._lock:
                woken = [w for i in finalized for w in self._waits.get(i, ())]
            for wait in woken:
                wait.wake(POLLED)
