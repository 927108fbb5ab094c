"""The ports the process tests hand to servers: never from the range the kernel gives out itself."""

from __future__ import annotations

import socket

from tests.support import ports
from tests.support.ports import LOWEST, ephemeral_low, reserve_port


def test_reserved_ports_sit_below_the_ephemeral_range_and_are_never_repeated() -> None:
    ports = [reserve_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST <= p < ephemeral_low() for p in ports)


def test_a_port_someone_listens_on_is_never_reserved() -> None:
    window = next(w for w in (range(s, s + 100) for s in range(20_000, 30_000, 100)) if _open(w[-3:]))
    held: list[socket.socket] = []
    try:
        for port in window[:-3]:  # hold all but the last three; taken ones count as held too
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        got = {reserve_port(window.start, window.stop) for _ in range(3)}
        assert got <= set(window[-3:]), f"reserved {sorted(got)}: some of them other sockets hold"
        assert len(got) == 3
    finally:
        for s in held:
            s.close()


def _open(candidates: range) -> bool:
    """Whether these ports are neither handed out already nor held by anyone."""
    if any(p in ports._handed_out for p in candidates):
        return False
    return all(ports._bindable(p) for p in candidates)
