"""A tiny TCP proxy for tests: forwards bytes to a server and can stall or cut the connections.

Stalling (``pause``) is what a congested network or a slow server looks like
to the client; cutting (``cut``) is a dropped connection. Nothing is mocked:
the client and server speak real gRPC through it (the relay is tests/support/relay.py).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.relay import TcpRelay


class TcpProxy(TcpRelay[None]):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, name="proxy")
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        self.connections = 0
        self._start()

    def _opened(self, downstream: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            self._sockets += [downstream, upstream]
            self.connections += 1

    def _hold(self, conn: None, direction: str) -> None:
        self._flowing.wait()

    def pause(self) -> None:
        """Stop forwarding in both directions (connections stay open)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection open now; new ones are accepted as before."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()
        self._flowing.set()
