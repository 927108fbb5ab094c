"""Shard ownership across replicas: one live stream per rank, whichever replica it reached.

Why: on one server a second stream for a rank is refused (ABORTED) while the
first lives (``service/leases.py``, in memory). With replicas the second stream
may reach another process, so the hold lives in the database: a row of
``shard_owners`` per rank, naming the replica and the stream (a token) that owns
it, with an expiry on the database clock (one clock for every replica).

- **Taken at open**, by an insert that, on a row already there, takes it over
  only if it expired or belongs to this replica (whose own lease table already
  let this stream in: the row is a stream of ours that ended and whose release
  has not landed yet). Nothing returned: a live stream elsewhere owns the rank.
- **Renewed while the stream lives**, by one statement a replica every third of
  the expiry for all its streams together, so the cost does not grow with the
  streams and commits carry nothing extra. The same heartbeat deletes rows of
  this replica that no stream holds any more (a release that failed while the
  database was away), and notices holds another replica took over after this
  one could not renew them in time (``lost``): that stream is then ended. Rows
  of replicas that died an hour ago and more are deleted by any heartbeat.
- **Released** when the stream ends, after its last commit (the lease table's
  rule), and every row of the replica when its store closes (a graceful stop).
- **Expiry**: a replica that dies (SIGKILL, a lost node) or stalls renews
  nothing; its ranks can be taken over ``ttl_s`` after its last renewal, which is
  how a stream resumes on another replica.

The hold decides who may stream, not what commits: exactly-once is the chunk
key's (evaluation, rank, sequence), so a stream that lost its hold while
stalled and wakes up still cannot commit a sequence twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from evalstream.service.store.base import ShardRow
from evalstream.service.store.postgres_reads import Row, shard_in
from evalstream.service.store.postgres_renewal import Renewal, replica_name

log = logging.getLogger(__name__)

EXPIRES = "clock_timestamp() + make_interval(secs => %s)"
# Rows of holds expired this long ago are deleted by any replica's heartbeat (a replica that died
# never released them); long enough that no replica still streaming could be waiting to renew one.
FORGOTTEN = "1 hour"


class Ownership:
    """The holds of this replica's streams (token -> evaluation id and rank), renewed in the background."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.replica = replica_name()
        self._held: dict[str, tuple[str, int]] = {}
        # Tokens whose taking is in flight: the heartbeat must neither delete their row nor call them lost.
        self._taking: set[str] = set()
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._renewal = Renewal(ttl_s, "evalstream-shard-holds", "shard holds")

    def acquire_in(
        self, conn: psycopg.Connection[Row], evaluation_id: str, rank: int, token: str
    ) -> ShardRow | None:
        """Own the rank for ``token`` (after ``taking``); the shard as it stands once owned, None if a
        live stream of another replica owns it."""
        won = conn.execute(
            "INSERT INTO shard_owners (evaluation_id, rank, replica, token, expires) "
            f"VALUES (%s, %s, %s, %s, {EXPIRES}) ON CONFLICT (evaluation_id, rank) DO UPDATE SET "
            "replica = EXCLUDED.replica, token = EXCLUDED.token, expires = EXCLUDED.expires "
            "WHERE shard_owners.expires < clock_timestamp() OR shard_owners.replica = EXCLUDED.replica "
            "RETURNING token",
            (evaluation_id, rank, self.replica, token, self.ttl_s),
        ).fetchone()
        return None if won is None else shard_in(conn, evaluation_id, rank)

    def taking(self, token: str) -> None:
        """Before the taking transaction: its row, once committed, is not one to clean up."""
        with self._lock:
            self._taking.add(token)

    def acquired(self, evaluation_id: str, rank: int, token: str, owned: bool) -> None:
        """After the taking transaction ended: hold ``token`` if it committed owning the rank."""
        with self._lock:
            self._taking.discard(token)
            if owned:
                self._held[token] = (evaluation_id, rank)

    def release_in(self, conn: psycopg.Connection[Row], evaluation_id: str, rank: int, token: str) -> None:
        """Give the rank up (idempotent; a row another stream took over is left alone)."""
        with self._lock:
            self._held.pop(token, None)
            self._lost.discard(token)
        conn.execute(
            "DELETE FROM shard_owners WHERE evaluation_id = %s AND rank = %s AND token = %s",
            (evaluation_id, rank, token),
        )

    def release_all_in(self, conn: psycopg.Connection[Row]) -> None:
        """Every hold of this replica (its store is closing: its streams have ended)."""
        with self._lock:
            self._held.clear()
        conn.execute("DELETE FROM shard_owners WHERE replica = %s", (self.replica,))

    def lost(self, token: str) -> bool:
        """Whether another stream took the hold of ``token`` over (it was not renewed in time)."""
        return token in self._lost

    def renew_in(self, conn: psycopg.Connection[Row]) -> None:
        """Push the expiry of every hold of this replica forward; note the ones another replica took
        over; delete rows of this replica that no stream holds (releases that never landed)."""
        with self._lock:
            held = list(self._held)
            keep = held + list(self._taking)
        renewed = {
            r["token"]
            for r in conn.execute(
                f"UPDATE shard_owners SET expires = {EXPIRES} WHERE replica = %s AND token = ANY(%s) "
                "RETURNING token",
                (self.ttl_s, self.replica, held),
            ).fetchall()
        }
        conn.execute(
            "DELETE FROM shard_owners WHERE replica = %s AND NOT (token = ANY(%s))", (self.replica, keep)
        )
        # Holds of replicas that died long ago: an expired hold is free anyway, the row only takes room.
        conn.execute(f"DELETE FROM shard_owners WHERE expires < clock_timestamp() - interval '{FORGOTTEN}'")
        with self._lock:
            for token in held:
                if token not in renewed and self._held.pop(token, None) is not None:
                    self._lost.add(token)
                    log.warning("a stream's hold on its rank was taken over by another stream; ending it")

    def start(self, renew: Callable[[], None]) -> None:
        """Run ``renew()`` every third of the hold's life on a daemon thread until ``stop()``."""
        self._renewal.start(renew)

    def stop(self) -> None:
        self._renewal.stop()
