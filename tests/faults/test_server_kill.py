"""Exactly once while the server is SIGKILLed at random moments and restarted.

Several ranks stream through the client library (reconnect, reopen, replay from
the acknowledged sequence) while a seeded schedule kills the server: after a
random delay, before or after the N-th chunk commit, after a close, before or
after the finalize. The finalized result must equal the engine's on exactly the
data sent: counts bit for bit, sums to 1e-12 relative.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evalstream.service.settings import Settings
from tests.faults.conftest import FaultLog
from tests.faults.harness import ServerProcess
from tests.faults.schedule import KINDS, Played, make_schedule, play
from tests.faults.workload import (
    assert_same_result,
    fetch_result,
    join_ranks,
    rank_batches,
    reference,
    start_ranks,
)

NUM_CLASSES = 50
RANKS = 3
BATCHES = 12  # one chunk each
ROWS = 40
PACE_S = 0.08
FAULTS = 2
CI_SEEDS = range(3)
SLOW_SEEDS = range(3, 23)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "srv")
    yield srv
    srv.close()


def _scenario(server: ServerProcess, seed: int, faults: int) -> Played:
    data = [rank_batches(r, BATCHES, ROWS, NUM_CLASSES, seed) for r in range(RANKS)]
    schedule = make_schedule(seed, faults, RANKS, stream_s=BATCHES * PACE_S)
    server.start(crash_at=schedule[0].crash_at)
    model = f"kill-{seed}"
    runs = start_ranks(server.target, data, model=model, num_classes=NUM_CLASSES, pace_s=PACE_S)
    played = play(server, schedule, runs, timeout=240)
    join_ranks(runs)
    evaluation = fetch_result(server.target, model)
    config = Settings.load(server.config, env={}).engine_config()
    want = reference(data, NUM_CLASSES, config)
    assert evaluation.result.num_samples == RANKS * BATCHES * ROWS
    assert evaluation.result.duplicates_dropped == 0
    assert_same_result(evaluation.result, want)
    for run in runs:
        assert run.summary is not None and run.summary.samples == BATCHES * ROWS
    assert played.fired, f"no fault fired in {schedule}"
    print(f"seed {seed}: fired {played.fired}, missed {played.missed}, starts {server.starts}")
    return played


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_sigkill_schedule_loses_and_duplicates_nothing(
    server: ServerProcess, seed: int, fault_log: FaultLog
) -> None:
    fault_log.record("server SIGKILL + restart", _scenario(server, seed, FAULTS))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_sigkill_schedule_many_seeds(server: ServerProcess, seed: int, fault_log: FaultLog) -> None:
    fault_log.record("server SIGKILL + restart", _scenario(server, seed, FAULTS + 1))


def test_schedules_cover_every_kind_of_fault() -> None:
    """The CI seeds alone exercise every kind (the rotation in make_schedule guarantees it)."""
    kinds = {f.kind for seed in CI_SEEDS for f in make_schedule(seed, FAULTS, RANKS, 1.0)}
    assert kinds == set(KINDS)
