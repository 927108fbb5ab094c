"""ChaosProxy: a TCP proxy between client and server that drops or stalls connections on a seeded plan.

Each accepted connection draws a plan from the proxy's seeded generator: pass
untouched, or after a random number of bytes in one direction either drop the
connection (both sides reset), stall it (no bytes either way for a while, the
sockets stay open), or black-hole the replies (the server keeps receiving and
committing, the client hears nothing) and then drop it. The black hole is what
makes chunks "committed but not acknowledged", which the client must re-send
and the server must recognise. After ``max_faults`` faulty connections every
connection passes, so a schedule always ends. The byte relay itself is tests/support/relay.py.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.support.relay import DOWN, UP, TcpRelay

ACTIONS = ("drop", "stall", "blackhole")


@dataclass
class Plan:
    action: str  # "pass" | one of ACTIONS
    direction: str = UP
    after_bytes: int = 0
    stall_s: float = 0.0

    def __str__(self) -> str:
        if self.action == "pass":
            return "pass"
        extra = f" for {self.stall_s:.2f}s" if self.action != "drop" else ""
        return f"{self.action} after {self.after_bytes} B {self.direction}{extra}"


@dataclass
class _Conn:
    plan: Plan
    sockets: tuple[socket.socket, socket.socket]
    flowing: threading.Event = field(default_factory=threading.Event)
    replies_open: threading.Event = field(default_factory=threading.Event)
    sent: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    triggered: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ChaosProxy(TcpRelay[_Conn]):
    """Listens on 127.0.0.1:<port>; forwards to ``upstream``; faults follow ``seed``."""

    def __init__(
        self,
        upstream: str,
        seed: int,
        max_faults: int = 4,
        fault_probability: float = 0.8,
        max_after_bytes: int = 60_000,
        max_after_reply_bytes: int = 1_500,
        actions: tuple[str, ...] = ACTIONS,
    ) -> None:
        super().__init__(upstream, name="chaos")
        self._rng = random.Random(seed)
        self._max_faults = max_faults
        self._p = fault_probability
        self._max_after = {UP: max_after_bytes, DOWN: max_after_reply_bytes}
        self._actions = actions
        self._conns: list[_Conn] = []
        self.plans: list[Plan] = []
        self.faults_fired: list[str] = []
        self._start()

    def _plan(self) -> Plan:
        faulty = sum(p.action != "pass" for p in self.plans)
        if faulty >= self._max_faults or self._rng.random() > self._p:
            return Plan("pass")
        action = self._rng.choice(self._actions)
        direction = DOWN if action == "blackhole" else self._rng.choice((UP, DOWN))
        return Plan(
            action,
            direction=direction,
            after_bytes=self._rng.randint(0, self._max_after[direction]),
            stall_s=self._rng.uniform(0.1, 0.8),
        )

    def _opened(self, downstream: socket.socket, upstream: socket.socket) -> _Conn:
        with self._lock:
            plan = self._plan()
            self.plans.append(plan)
            conn = _Conn(plan, (downstream, upstream))
            self._conns.append(conn)
        conn.flowing.set()
        conn.replies_open.set()
        return conn

    def _refused(self, downstream: socket.socket) -> None:
        _reset(downstream)

    def _hold(self, conn: _Conn, direction: str) -> None:
        conn.flowing.wait()
        if direction == DOWN:
            conn.replies_open.wait()

    def _forwarded(self, conn: _Conn, direction: str, n: int) -> None:
        plan = conn.plan
        with conn.lock:
            conn.sent[direction] += n
            fire = (
                not conn.triggered
                and plan.action != "pass"
                and direction == plan.direction
                and conn.sent[direction] >= plan.after_bytes
            )
            if fire:
                conn.triggered = True
        if fire:
            with self._lock:
                self.faults_fired.append(str(plan))
            threading.Thread(target=self._fault, args=(conn,), daemon=True).start()

    def _fault(self, conn: _Conn) -> None:
        plan = conn.plan
        if plan.action == "drop":
            _reset(*conn.sockets)
        elif plan.action == "stall":
            conn.flowing.clear()
            time.sleep(plan.stall_s)
            conn.flowing.set()
        else:  # blackhole: requests still reach the server, replies are held, then the connection dies
            conn.replies_open.clear()
            time.sleep(plan.stall_s)
            _reset(*conn.sockets)
            conn.replies_open.set()

    @property
    def connections(self) -> int:
        return len(self.plans)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.flowing.set()
            conn.replies_open.set()
            _reset(*conn.sockets)


def _reset(*sockets: socket.socket) -> None:
    """Cut with a TCP reset (linger 0), as a dropped route or a killed middlebox does; the shutdown
    first wakes the proxy's own threads blocked on these sockets."""
    for s in sockets:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
