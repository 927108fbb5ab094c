"""Loopback ports for servers the tests start as separate processes, on a port they name.

Why not ``bind(("127.0.0.1", 0))`` and hand the number on: the kernel answers that from the
ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999 by default), the same range it
draws from for the local end of every outgoing connection. Between the moment the probe socket
closes and the moment the server binds, any of the suite's thousands of connections (gRPC
channels, PostgreSQL sessions, Prometheus scrapes) may take that number as its source port, and
the server then dies with ``EADDRINUSE``. A server that is killed and restarted on its port (the
fault and replica tests) is open to the same race for the whole time it is down.

So ``reserve_port`` draws from below the ephemeral range, where the kernel never picks a port on
its own; only a process that names the port can hold it. Each number is handed out once per test
process, so a server that is down for a restart keeps its port. The draw is random, so two test
runs on one machine rarely meet, and a port something already listens on is skipped.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below this sit well-known service defaults (5432, 8080, 9090)
DEFAULT_EPHEMERAL_LOW = 32_768

_lock = threading.Lock()
_handed_out: set[int] = set()
_draw = random.Random()  # seeded from the OS: two test processes draw different sequences


def ephemeral_low() -> int:
    """The first port the kernel may pick on its own (Linux's setting; the IANA default elsewhere)."""
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve_port(low: int = LOWEST, high: int | None = None) -> int:
    """A port of 127.0.0.1 that no one listens on, outside the kernel's ephemeral range.

    Args:
        low: the lowest port to draw.
        high: one past the highest; the start of the ephemeral range when omitted.

    Returns:
        A port in ``[low, high)`` not handed out before in this process.

    Raises:
        RuntimeError: no such port was found in 1,000 draws.
    """
    if high is None:
        high = ephemeral_low()
        if high - low < 1_000:  # an unusual range setting leaves no room below it: the kernel's choice
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                return int(s.getsockname()[1])
    with _lock:
        for _ in range(1_000):
            port = _draw.randrange(low, high)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free loopback port in [{low}, {high}) after 1,000 draws")
