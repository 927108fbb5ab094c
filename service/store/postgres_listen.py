"""The replica's ear on finalizations: one connection doing ``LISTEN evalstream_finalized``.

Why: a finalize commits ``NOTIFY evalstream_finalized, '<evaluation id>'`` in its own
transaction (``postgres.py``), so PostgreSQL delivers exactly one notification per committed
finalization to every listening session, whichever replica finalized. Each replica keeps one
dedicated autocommit connection (not a pooled one: a pooled connection is handed to other work,
and a session only hears notifications while it is listening) and relays every payload to
``announce``, which wakes that evaluation's waiters (``service/finalizations.py``).

The connection can drop: the database restarts, an operator ends the session
(``pg_terminate_backend``), the network fails (TCP keepalives notice within ~25 s). Whatever
was notified meanwhile is lost, so ``connected(False)`` tells the waiters to poll the store, the
thread reconnects every ``retry_s`` and, once ``LISTEN`` is in place again, ``connected(True)``
has every waiter checked once against the store before they rely on notifications again.

A session in a transaction-pooling proxy (PgBouncer's transaction mode) does not keep its
``LISTEN``; point ``store_url`` at PostgreSQL or a session-pooling proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

# Finalizations are announced on this channel; the payload is the evaluation id.
CHANNEL = "evalstream_finalized"
# Every listener's session is named this, with the replica's process id, in pg_stat_activity.
APPLICATION_NAME = "evalstream-listen"
# How long one wait for notifications lasts before the stop flag is looked at again.
WAKE_S = 0.5
DEFAULT_RETRY_S = 0.5


def application_name(pid: int | None = None) -> str:
    """The listener's ``application_name`` in ``pg_stat_activity`` for the replica process ``pid``."""
    return f"{APPLICATION_NAME}:{os.getpid() if pid is None else pid}"


class FinalizationListener:
    """A thread holding one listening connection; reconnects until ``close()``."""

    def __init__(
        self,
        url: str,
        announce: Callable[[str], None],
        connected: Callable[[bool], None],
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        self._url = url
        self._announce = announce
        self._connected = connected
        self.retry_s = retry_s
        # Connections made so far (1 after the first; each reconnect adds one).
        self.connects = 0
        self.backend_pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="evalstream-listen", daemon=True)
        self._thread.start()

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=5,
            application_name=application_name(),
            # A peer that vanished without closing (a lost node, a partition) is noticed, not waited on.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                log.debug("finalization listener cannot connect yet: %s", exc)
                self._stop.wait(self.retry_s)
                continue
            self.connects += 1
            self.backend_pid = conn.info.backend_pid
            self._connected(True)
            try:
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=WAKE_S):
                        self._announce(note.payload)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.warning("finalization listener lost its connection (%s); reconnecting", exc)
            finally:
                self.backend_pid = None
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                if not self._stop.is_set():
                    self._connected(False)
            self._stop.wait(self.retry_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAKE_S * 4 + 5)
