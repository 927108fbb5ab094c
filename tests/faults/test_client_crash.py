"""A rank's process is SIGKILLed mid-stream; a new process reopens the same shard and resumes.

Rank 0 runs as its own process (``rank_process``) and is killed at a seeded
moment (after a seeded number of added batches, so sometimes with chunks in
flight, sometimes between them), once or twice; its replacement re-adds the
same batches, the server acknowledges what it already committed as duplicates.
Rank 1 streams normally. The finalized result must be the engine's on the data.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from evalstream.service.settings import Settings
from tests.faults.conftest import FaultLog
from tests.faults.harness import ServerProcess
from tests.faults.workload import (
    assert_same_result,
    fetch_result,
    join_ranks,
    rank_batches,
    reference,
    start_ranks,
)

NUM_CLASSES = 50
BATCHES = 12
ROWS = 40
PACE_S = 0.05
ROOT = Path(__file__).resolve().parents[2]


def _rank_process(server: ServerProcess, model: str, seed: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    args = ["--target", server.target, "--model", model, "--rank", "0", "--world-size", "2"]
    args += ["--seed", str(seed), "--batches", str(BATCHES), "--rows", str(ROWS)]
    args += ["--classes", str(NUM_CLASSES), "--pace", str(PACE_S)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.rank_process", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _kill_after(proc: subprocess.Popen[str], batches: int) -> str:
    """Read progress until ``batches`` batches were added, then SIGKILL; what it had reported."""
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        last = line.strip()
        if last.startswith(f"added {batches - 1} "):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return last


def _scenario(server: ServerProcess, seed: int, crashes: int) -> list[str]:
    rng = random.Random(seed)
    model = f"client-crash-{seed}"
    data = [rank_batches(r, BATCHES, ROWS, NUM_CLASSES, seed) for r in range(2)]
    other = start_ranks(
        server.target, [data[1]], world_size=2, first_rank=1, model=model, num_classes=NUM_CLASSES
    )
    fired = []
    for _ in range(crashes):
        at = rng.randint(1, BATCHES - 1)
        reported = _kill_after(_rank_process(server, model, seed), at)
        fired.append(f"kill rank process after {at} batches ({reported})")
    final = _rank_process(server, model, seed)
    out, _ = final.communicate(timeout=240)
    assert final.returncode == 0, out
    assert f"closed {BATCHES * ROWS}" in out, out
    join_ranks(other)
    evaluation = fetch_result(server.target, model)
    config = Settings.load(server.config, env={}).engine_config()
    assert evaluation.result.num_samples == 2 * BATCHES * ROWS
    assert_same_result(evaluation.result, reference(data, NUM_CLASSES, config))
    return fired


@pytest.mark.parametrize("seed", range(3))
def test_a_new_process_resumes_a_killed_ranks_shard(
    server: ServerProcess, seed: int, fault_log: FaultLog
) -> None:
    fault_log.record("client process SIGKILL + new process", _scenario(server, seed, crashes=1 + seed % 2))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 15))
def test_client_crash_many_seeds(server: ServerProcess, seed: int, fault_log: FaultLog) -> None:
    fault_log.record("client process SIGKILL + new process", _scenario(server, seed, crashes=1 + seed % 3))
