"""The DDP example runs as documented: two gloo processes on CPU, an in-process server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_eval.py"


def test_ddp_example_streams_from_two_ranks_and_rank0_prints_the_merged_result() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--samples", "4000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    sent = re.findall(r"rank (\d): step 1 sent (\d+) samples", done.stdout)
    assert sorted(r for r, _ in sent) == ["0", "1"]
    assert sum(int(n) for _, n in sent) == 1000
    # By default rank 0 reduces on its own device and rank 1 sends logits: one merged evaluation.
    assert sorted(re.findall(r"sent \d+ samples in \d+ chunks \(reduce=(\w+)\)", done.stdout)) == [
        "client",
        "server",
    ]
    result = re.search(r"step 1: nll (\S+)\s+top-1 (\S+)", done.stdout)
    assert result is not None, done.stdout
    assert 0.0 < float(result.group(1)) < 5.0 and 0.0 < float(result.group(2)) <= 1.0
