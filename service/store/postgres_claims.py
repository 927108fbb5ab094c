"""Finalizer claims: which replica finalizes an evaluation, and who takes over when it goes away.

Why claims: the replica whose close completed an evaluation finalizes it, but it
may die (SIGKILL, a lost node) or stall (SIGSTOP, a long GC pause, a network
partition) between the close and the finalize commit. A claim is three columns
of the evaluation row: the owner, an epoch that every new claim increments, and
an expiry on the database clock (one clock for all replicas, so no replica's
clock skew can steal or extend a claim). The owner renews its claims while it
works (a heartbeat thread, every third of the claim's life); every replica
sweeps for completed evaluations whose claim expired and claims them itself.

The finalize commit is conditioned on the epoch the finalizer claimed at
(``WHERE claim_epoch = E``): a replica that paused past its claim's expiry and
wakes after another has taken over finds a newer epoch and changes nothing, so
the result is committed once whoever computes it, even twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from evalstream.service.store.postgres_reads import Row
from evalstream.service.store.postgres_renewal import Renewal, replica_name

# A claim is taken only on an open evaluation whose ranks have all closed and that nobody holds.
CLAIMABLE = (
    "state = 'open' AND closed >= world_size AND (claim_expires IS NULL OR claim_expires < clock_timestamp())"
)
CLAIM = (
    "claim_owner = %s, claim_epoch = claim_epoch + 1, "
    "claim_expires = clock_timestamp() + make_interval(secs => %s)"
)


class Claims:
    """The claims this store (one replica) holds: evaluation id -> epoch, renewed in the background."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.owner = replica_name()
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._renewal = Renewal(ttl_s, "evalstream-claims", "finalizer claims")

    def claim_in(self, conn: psycopg.Connection[Row], evaluation_id: str) -> int | None:
        """Claim one evaluation inside the caller's transaction (the closing one); its epoch or None."""
        row = conn.execute(
            f"UPDATE evaluations SET {CLAIM} WHERE id = %s AND {CLAIMABLE} RETURNING claim_epoch",
            (self.owner, self.ttl_s, evaluation_id),
        ).fetchone()
        return None if row is None else int(row["claim_epoch"])

    def claim_pending_in(self, conn: psycopg.Connection[Row], limit: int) -> dict[str, int]:
        """Claim completed evaluations nobody holds (their finalizer died or stalled); id -> epoch."""
        rows = conn.execute(
            f"UPDATE evaluations SET {CLAIM} WHERE id IN (SELECT id FROM evaluations WHERE {CLAIMABLE} "
            "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, claim_epoch",
            (self.owner, self.ttl_s, limit),
        ).fetchall()
        return {r["id"]: int(r["claim_epoch"]) for r in rows}

    def hold(self, claims: dict[str, int]) -> None:
        """Remember claims that committed (call after the claiming transaction)."""
        with self._lock:
            self._held.update(claims)

    def take(self, evaluation_id: str) -> int | None:
        """The epoch this replica holds for the evaluation (forgotten: a finalize uses it once)."""
        with self._lock:
            return self._held.pop(evaluation_id, None)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def renew_in(self, conn: psycopg.Connection[Row]) -> None:
        """Push the expiry of every claim still ours forward; drop the ones another replica took."""
        ids = self.held()
        if not ids:
            return
        rows = conn.execute(
            "UPDATE evaluations SET claim_expires = clock_timestamp() + make_interval(secs => %s) "
            "WHERE id = ANY(%s) AND claim_owner = %s AND state = 'open' RETURNING id, claim_epoch",
            (self.ttl_s, ids, self.owner),
        ).fetchall()
        still = {r["id"]: int(r["claim_epoch"]) for r in rows}
        with self._lock:
            for evaluation_id in ids:
                if evaluation_id in self._held and self._held[evaluation_id] != still.get(evaluation_id):
                    del self._held[evaluation_id]  # finalized, or claimed anew by another replica

    def start(self, renew: Callable[[], None]) -> None:
        """Run ``renew()`` every third of the claim's life on a daemon thread until ``stop()``."""
        self._renewal.start(renew)

    def stop(self) -> None:
        self._renewal.stop()
