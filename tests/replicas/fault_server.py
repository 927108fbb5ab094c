"""A replica that kills or pauses itself at a chosen point of the store protocol (replica tests only).

    python tests/replicas/fault_server.py --at finalize:before:1 --action stop --config evalstream.toml

``--at METHOD:WHEN:N`` is the point of ``tests/faults/crash_server.py`` (the N-th call of a
``Store`` method, before it runs or after it returned), here on the PostgreSQL store.
``--action kill`` sends the process SIGKILL there (a lost node); ``--action stop`` sends it
SIGSTOP (a long pause: GC, swap, a frozen VM), and once a test sends SIGCONT the call goes on
as if nothing happened, which is exactly what a late finalizer does. Either way the process
writes ``fault point ... reached`` first and, for ``stop``, ``... passed`` after the call.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from tests.faults.crash_server import parse


def install(spec: str, action: str) -> None:
    from evalstream.service.store.postgres import PostgresStore

    names, when, n = parse(spec)
    calls = 0
    lock = threading.Lock()
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP

    def fault() -> None:
        sys.stderr.write(f"fault point {spec} reached: {sig.name}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), sig)

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            with lock:
                calls += 1
                fire = calls == n
            if fire and when == "before":
                fault()
            out = original(self, *args, **kwargs)
            if fire and when == "after":
                fault()
            if fire:
                sys.stderr.write(f"fault point {spec} passed\n")
                sys.stderr.flush()
            return out

        return wrapper

    for name in names:
        setattr(PostgresStore, name, wrap(getattr(PostgresStore, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--at", required=True)
    parser.add_argument("--action", choices=("kill", "stop"), required=True)
    args, rest = parser.parse_known_args()
    install(args.at, args.action)
    from evalstream.service.server import main as server_main

    return server_main(rest)


if __name__ == "__main__":
    sys.exit(main())
