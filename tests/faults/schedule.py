"""Seeded fault schedules for the server-kill scenario, and the driver that plays one.

A schedule is a list of faults applied one after another while every rank
streams: a SIGKILL after a random delay, or a crash point of ``crash_server.py``
(the N-th commit, close or finalize of the running process). After each fault
the server restarts on the same port and data directory; after the last one it
keeps running and the ranks finish.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.faults.harness import ServerProcess
from tests.faults.workload import RankRun, running

DELAY = "delay"
# What each kind of fault interrupts (docs/reliability.md lists them).
KINDS = (
    DELAY,  # a random moment: usually mid-chunk, sometimes mid-open or mid-close
    "commit:before",  # a chunk reduced but not committed
    "commit:after",  # committed, not acknowledged
    "close:after",  # a close committed, not answered
    "finalize:before",  # every rank closed, the result computed but not stored
    "finalize:after",  # the result stored, the closing rank not told
)


@dataclass(frozen=True)
class Fault:
    kind: str
    delay_s: float = 0.0
    nth: int = 1

    @property
    def crash_at(self) -> str:
        return "" if self.kind == DELAY else f"{self.kind}:{self.nth}"

    def __str__(self) -> str:
        return f"kill after {self.delay_s:.2f}s" if self.kind == DELAY else self.crash_at


MIDDLE = (DELAY, "commit:before", "commit:after", "close:after")
LAST = ("finalize:before", "finalize:after", "close:after", DELAY, "commit:after", "commit:before")


def make_schedule(seed: int, faults: int, ranks: int, stream_s: float) -> list[Fault]:
    """``faults`` faults; the kinds rotate with the seed so that seeds 0, 1, 2 together cover every kind.

    A finalize happens once, at the end, so finalize faults come last. Crash points
    count from the restart before them, so N stays small enough to be reached.
    """
    rng = random.Random(seed)
    kinds = [MIDDLE[(seed + i) % len(MIDDLE)] for i in range(faults - 1)] + [LAST[seed % len(LAST)]]
    out: list[Fault] = []
    for kind in kinds:
        if kind == DELAY:
            out.append(Fault(kind, delay_s=rng.uniform(0.05, stream_s)))
        elif kind.startswith("commit"):
            out.append(Fault(kind, nth=rng.randint(1, 2 * ranks)))
        elif kind == "close:after":
            out.append(Fault(kind, nth=rng.randint(1, ranks)))
        else:
            out.append(Fault(kind, nth=1))
    return out


@dataclass
class Played:
    """What actually happened: faults that fired (a crash point may not be reached) and restarts."""

    fired: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


def play(server: ServerProcess, schedule: Sequence[Fault], runs: Sequence[RankRun], timeout: float) -> Played:
    """Apply the faults in order while ``runs`` stream; leave a clean server running at the end.

    The caller started ``server`` with ``schedule[0].crash_at`` before starting the ranks.
    """
    played = Played()
    deadline = time.monotonic() + timeout
    for i, fault in enumerate(schedule):
        if fault.kind == DELAY:
            end = time.monotonic() + fault.delay_s
            while time.monotonic() < end and running(runs):
                time.sleep(0.01)
            if running(runs) or i == 0:
                server.kill()
                played.fired.append(str(fault))
            else:
                played.missed.append(str(fault))
        else:
            fired = False
            while not fired and time.monotonic() < deadline:
                fired = server.wait_crash(timeout=0.05)
                if not fired and not running(runs):
                    break
            (played.fired if fired else played.missed).append(str(fault))
        if not server.alive():
            nxt = schedule[i + 1].crash_at if i + 1 < len(schedule) else ""
            server.start(crash_at=nxt)
    return played
