"""What every time-limited hold of a replica needs: a name for the replica and a renewing thread.

Finalizer claims (``postgres_claims.py``) and stream holds (``postgres_ownership.py``) both expire
on the database clock unless their replica renews them; both renew every third of their life, so
two renewals can fail (a slow database, a paused process) before anything is lost.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

log = logging.getLogger(__name__)


def replica_name() -> str:
    """host:pid:random, unique per store instance: what claims and holds record as their owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Renewal:
    """Runs a renewal every third of ``ttl_s`` on a daemon thread, from ``start`` until ``stop``."""

    def __init__(self, ttl_s: float, thread_name: str, what: str) -> None:
        self.ttl_s = ttl_s
        self._thread_name, self._what = thread_name, what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, renew: Callable[[], None]) -> None:
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    renew()
                except Exception:
                    log.warning("renewing %s failed; retrying", self._what, exc_info=True)

        self._thread = threading.Thread(target=loop, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
