"""One rank as its own process (``python -m tests.faults.rank_process``), for client-crash tests.

Streams the deterministic batches of ``workload.rank_batches`` through the client
library and prints one line per added batch (``added <i> committed <samples>``)
so a test can kill it at a chosen moment; prints ``closed <samples>`` at the end.
A second process for the same rank re-adds the same batches in the same order:
chunks below the server's resume point are acknowledged as duplicates and the
rest are committed (docs/client.md, delivery guarantees).
"""

from __future__ import annotations

import argparse
import sys
import time

from evalstream.client import EvalClient
from tests.faults.workload import PATIENT, rank_batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--pace", type=float, default=0.0)
    a = p.parse_args(argv)
    batches = rank_batches(a.rank, a.batches, a.rows, a.classes, a.seed)
    with EvalClient(a.target, retry=PATIENT) as client:
        ev = client.evaluation(
            run="faults",
            model=a.model,
            num_classes=a.classes,
            rank=a.rank,
            world_size=a.world_size,
            open_timeout=120,
        )
        print(f"opened resumed_from {ev.resumed_from}", flush=True)
        for i, (scores, labels) in enumerate(batches):
            ev.add(scores, labels)
            print(f"added {i} committed {ev.samples_committed}", flush=True)
            if a.pace:
                time.sleep(a.pace)
        summary = ev.close(timeout=120)
    print(f"closed {summary.samples}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
