"""Fault-test plumbing: one server per module, the slow switch, and the tally of fault schedules
printed after the run.

Longer schedules (``@pytest.mark.slow``) run only with EVALSTREAM_SLOW_TESTS=1, so
CI stays within minutes. Every scenario records the faults it actually injected;
the terminal summary says how many schedules ran per scenario and that each one
ended with the engine's exact result (a failing one fails its test instead).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from tests.faults.harness import ServerProcess

SLOW = os.environ.get("EVALSTREAM_SLOW_TESTS", "") not in ("", "0")
HERE = os.path.dirname(os.path.abspath(__file__))


class HasFired(Protocol):
    fired: list[str]


@dataclass
class FaultLog:
    """Scenario -> [faults injected by each passing schedule]."""

    schedules: dict[str, list[list[str]]] = field(default_factory=dict)

    def record(self, scenario: str, played: HasFired | Sequence[str]) -> None:
        fired = list(played.fired) if hasattr(played, "fired") else list(played)  # type: ignore[arg-type]
        self.schedules.setdefault(scenario, []).append(fired)


_LOG = FaultLog()


@pytest.fixture
def fault_log() -> FaultLog:
    return _LOG


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """One started server per test module (a module wanting a fresh, unstarted one per test has its own)."""
    srv = ServerProcess(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    srv.start()
    yield srv
    srv.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow fault schedule; set EVALSTREAM_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords and str(item.path).startswith(HERE):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _LOG.schedules:
        return
    terminalreporter.section("fault schedules (each ended with the engine's exact result)")
    for scenario, runs in sorted(_LOG.schedules.items()):
        faults = sum(len(r) for r in runs)
        terminalreporter.write_line(f"{scenario}: {len(runs)} schedules, {faults} faults injected")
