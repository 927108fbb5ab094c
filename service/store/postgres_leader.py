"""Which replica exports the evaluation gauges: the holder of one PostgreSQL advisory lock.

Why one: every replica reads the same database, so if each exported the quality and
progress gauges of every evaluation, Prometheus would hold each evaluation N times
and every dashboard sum would be N times too large. Service counters (RPCs, chunks,
bytes) stay per replica: they count what that process did.

Why a session advisory lock: it needs no table, no expiry and no clock. It is
held by one connection; when the replica that holds it dies, the database ends its
session (at once for a process that exits or is killed, after TCP keepalive for a
lost node) and the next replica to ask takes it over at its next scrape. A replica
that is paused keeps it until it resumes; the gauges are then stale in Prometheus
for that long, which its staleness handling shows as a gap.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import psycopg

log = logging.getLogger(__name__)

# "evalexpo" in ASCII: any constant every replica shares, different from the migration lock.
EXPORTER_LOCK = 0x6576616C6578706F


class ExporterLease:
    """``held()``: whether this replica exports the evaluation gauges now (takes the lock if free)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lock = threading.Lock()

    def held(self) -> bool:
        with self._lock:
            if self._conn is not None and not self._conn.closed:
                try:
                    self._conn.execute("SELECT 1")
                    return True
                except psycopg.Error:  # the session ended (database restart): the lock went with it
                    self._drop()
            try:
                conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            except psycopg.Error:
                return False
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (EXPORTER_LOCK,)).fetchone()
            if row is not None and row[0]:
                self._conn = conn
                log.info("this replica now exports the evaluation gauges")
                return True
            conn.close()
            return False

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()
