"""The real server, killed by SIGKILL at a chosen point of its store protocol (fault tests only).

    python tests/faults/crash_server.py --crash-at commit:after:7 --config evalstream.toml

``--crash-at METHOD:WHEN:N`` kills the process on the N-th call (1-based, counted
in this process) of a ``Store`` method, ``before`` it runs or ``after`` it has
returned. Nothing else changes: the server is ``evalstream.service.server.main``.

- ``commit:before:N``   chunks were received and reduced, not committed ("during a chunk");
- ``commit:after:N``    the chunks are committed, their acknowledgements not yet sent;
- ``close:after:N``     a shard's close is committed, the reply (and any finalize) not;
- ``finalize:before:N`` every rank closed and the metrics are computed, the result not stored;
- ``finalize:after:N``  the result is stored, the closing rank has not heard so.

The points sit on the public ``Store`` interface, so they name protocol steps,
not private functions of the server. ``commit`` counts ``commit_chunks`` (a staging block's
chunks, or one chunk, committed or rejected, in one transaction).
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

METHODS = {
    "open": ("open_shard",),
    "commit": ("commit_chunks",),
    "close": ("close_shard",),
    "finalize": ("finalize",),
}


def parse(spec: str) -> tuple[tuple[str, ...], str, int]:
    method, when, n = spec.split(":")
    if method not in METHODS or when not in ("before", "after") or int(n) < 1:
        raise ValueError(f"bad crash point {spec!r}: METHOD:before|after:N with METHOD in {sorted(METHODS)}")
    return METHODS[method], when, int(n)


def install(spec: str) -> None:
    """Wrap the store method(s) so their N-th call (counted together) kills the process at that side."""
    from evalstream.service.store.sqlite import SqliteStore

    names, when, n = parse(spec)
    calls = 0
    lock = threading.Lock()

    def die() -> None:
        sys.stderr.write(f"crash point {spec} reached: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            with lock:
                calls += 1
                fire = calls == n
            if fire and when == "before":
                die()
            out = original(self, *args, **kwargs)
            if fire and when == "after":
                die()
            return out

        return wrapper

    for name in names:
        setattr(SqliteStore, name, wrap(getattr(SqliteStore, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crash-at", required=True)
    args, rest = parser.parse_known_args()
    install(args.crash_at)
    from evalstream.service.server import main as server_main

    return server_main(rest)


if __name__ == "__main__":
    sys.exit(main())
