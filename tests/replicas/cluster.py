"""N evalstream replicas as real processes on loopback, sharing one PostgreSQL database.

Each replica is ``python -m evalstream.service.server`` with ``store_url`` set (or
``tests/replicas/fault_server.py`` when a test wants it to die or pause at a store
call), on its own port, with its own log. ``Finalizations`` listens on the store's
finalize channel: PostgreSQL delivers a NOTIFY only when the transaction that sent
it commits, so it counts committed finalizes, whoever made them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from evalstream.service.store.postgres import CHANNEL
from tests.faults.harness import ServerProcess
from tests.support.ports import reserve_port

FAULT_SERVER = Path(__file__).resolve().parent / "fault_server.py"
ROOT = Path(__file__).resolve().parents[2]


class Replica(ServerProcess):
    """A server process that may run the fault server instead of the plain one."""

    def start_with_fault(self, at: str, action: str, wait: bool = True) -> None:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
        child_env["PYTHONPATH"] = str(ROOT)  # the fault server imports tests.faults
        cmd = [
            sys.executable,
            str(FAULT_SERVER),
            "--at",
            at,
            "--action",
            action,
            "--config",
            str(self.config),
        ]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
            )
        self.starts += 1
        if wait:
            self.wait_ready()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """``n`` replicas on one database; ``start()`` boots them side by side, ``close()`` kills them."""

    def __init__(
        self, root: Path, store_url: str, n: int = 3, metrics: bool = False, **settings: Any
    ) -> None:
        # Short claims and holds: a test waits that long for another replica to take over.
        values: dict[str, Any] = {
            "store_url": store_url,
            "finalize_claim_s": 2.0,
            "shard_lease_s": 2.0,
            **settings,
        }
        self.metrics = [f"127.0.0.1:{reserve_port()}" if metrics else "" for _ in range(n)]
        self.replicas = [
            Replica(root / f"replica-{i}", **values, metrics_address=self.metrics[i]) for i in range(n)
        ]

    def start(self, skip: tuple[int, ...] = ()) -> None:
        for i, replica in enumerate(self.replicas):
            if i not in skip:
                replica.start(wait=False)
        for i, replica in enumerate(self.replicas):
            if i not in skip:
                replica.wait_ready()

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.replicas]

    def target_from(self, first: int) -> str:
        """Every replica as one gRPC ``ipv4:`` target, ``first`` first: gRPC's default policy
        (pick_first) streams to it, and to the next when it dies."""
        order = self.targets[first:] + self.targets[:first]
        return "ipv4:" + ",".join(order)

    def close(self) -> None:
        for replica in self.replicas:
            if replica.alive():
                if replica.proc is not None:
                    replica.proc.send_signal(signal.SIGCONT)  # a stopped process cannot die until resumed
                replica.kill()


class Finalizations:
    """Every committed finalize of the database, as its NOTIFY arrives (evaluation id -> count)."""

    def __init__(self, url: str) -> None:
        self.counts: Counter[str] = Counter()
        self._url = url
        self._conn = self._connect()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(self._url, autocommit=True)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                for note in self._conn.notifies(timeout=0.2):
                    with self._lock:
                        self.counts[note.payload] += 1
            except psycopg.OperationalError:  # the database restarted: listen again once it is back
                self._conn.close()
                while not self._stop.is_set():
                    try:
                        self._conn = self._connect()
                        break
                    except psycopg.OperationalError:
                        time.sleep(0.2)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()
