"""TcpRelay: the byte relay under the tests' TCP proxies (tests/client/proxy.py, tests/faults/chaos.py).

It listens on 127.0.0.1:<port>, opens one upstream connection per accepted client
connection and copies bytes with one thread per direction. The proxies differ only
in what they do to the traffic, so that is left to three hooks: ``_opened`` (what to
remember about a new connection), ``_hold`` (block before forwarding, to stall) and
``_forwarded`` (count bytes, to fire a fault at a chosen offset). Nothing is mocked:
client and server speak real gRPC through it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

UP, DOWN = "client->server", "server->client"

ConnT = TypeVar("ConnT")


class TcpRelay(ABC, Generic[ConnT]):
    """Forwards every connection to ``upstream``; subclasses call ``_start`` once their state exists."""

    def __init__(self, upstream: str, name: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._name = name
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()

    def _start(self) -> None:
        threading.Thread(target=self._accept, name=f"{self._name}-accept", daemon=True).start()

    @abstractmethod
    def _opened(self, downstream: socket.socket, upstream: socket.socket) -> ConnT:
        """Record a new connection pair; what it returns is handed to the hooks for that pair."""

    def _refused(self, downstream: socket.socket) -> None:
        """The upstream would not connect: end the client's connection (subclasses choose how)."""
        downstream.close()

    def _hold(self, conn: ConnT, direction: str) -> None:
        """Block before forwarding bytes in ``direction``; the default never blocks."""

    def _forwarded(self, conn: ConnT, direction: str, n: int) -> None:
        """``n`` more bytes went through in ``direction``; the default ignores it."""

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                self._refused(downstream)
                continue
            conn = self._opened(downstream, upstream)
            for src, dst, direction in ((downstream, upstream, UP), (upstream, downstream, DOWN)):
                threading.Thread(
                    target=self._pipe,
                    args=(conn, src, dst, direction),
                    name=f"{self._name}-pipe",
                    daemon=True,
                ).start()

    def _pipe(self, conn: ConnT, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                self._hold(conn, direction)
                dst.sendall(data)
                self._forwarded(conn, direction, len(data))
        except OSError:
            pass
        # One side ended: end the other too, so its pipe thread wakes and the client sees the close.
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
