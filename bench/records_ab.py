"""Records-mode ingest capacity of two git revisions, same session, interleaved.

Each revision is exported as ``bench.e2e_ab`` does (its own server code, stubs from its own proto);
both run this revision's ``bench/records.py`` (the same clients and measurement on both sides). Rounds
alternate the sides, each a fresh ``python -m bench.records --parts ingest`` process, so the load of
a shared machine hits both alike. Reported per side and stream count: the median over every run of
samples/s and of the server's CPU microseconds a record (which load inflates much less), their
spread, and the ratios B / A.

    .venv/bin/python -m bench.records_ab --against ee5e949 [--head HEAD] [--rounds 2] [--settle 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import table, write_json
from bench.e2e_ab import export_revision

HERE = Path(__file__).resolve().parent


def run_side(tree: Path, args: list[str]) -> dict[int, dict[str, list[float]]]:
    """One ``bench.records --parts ingest`` process in ``tree``: per stream count, its runs."""
    shutil.copy(HERE / "records.py", tree / "bench" / "records.py")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # found before the editable install's finder
    cmd = [sys.executable, "-m", "bench.records", "--parts", "ingest", *args]
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    found = json.loads((tree / "bench" / "results" / "records.json").read_text())
    return {
        row["streams"]: {"rate": row["runs samples/s"], "cpu": row["runs server cpu us/sample"]}
        for row in found["ingest"]
    }


def _spread(values: list[float]) -> str:
    f = ",.0f" if statistics.median(values) >= 1000 else ".3f"
    return f"{statistics.median(values):{f}} ({min(values):{f}}-{max(values):{f}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision of side A (before)")
    ap.add_argument("--head", default="HEAD", help="git revision of side B (after)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streams", default="1,2")
    ap.add_argument("--settle", type=float, default=15.0, help="pause after each run's finalize (s)")
    args = ap.parse_args()
    bench_args = ["--repeats", str(args.repeats), "--ingest-streams", args.streams]
    bench_args += ["--ingest-settle", str(args.settle)]
    runs: dict[str, dict[int, dict[str, list[float]]]] = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory(prefix="evalstream-records-ab-") as tmp:
        trees = {
            "A": export_revision(args.against, Path(tmp) / "a"),
            "B": export_revision(args.head, Path(tmp) / "b"),
        }
        for _ in range(args.rounds):
            for side, tree in trees.items():
                for streams, got in run_side(tree, bench_args).items():
                    mine = runs[side].setdefault(streams, {"rate": [], "cpu": []})
                    mine["rate"] += got["rate"]
                    mine["cpu"] += got["cpu"]
    rows: list[dict[str, Any]] = []
    for streams in sorted(runs["A"]):
        a, b = runs["A"][streams], runs["B"][streams]
        rows.append(
            {
                "streams": streams,
                "runs per side": len(a["rate"]),
                "A samples/s": _spread(a["rate"]),
                "B samples/s": _spread(b["rate"]),
                "B/A samples/s": round(statistics.median(b["rate"]) / statistics.median(a["rate"]), 3),
                "A server us/record": _spread(a["cpu"]),
                "B server us/record": _spread(b["cpu"]),
                "B/A server cpu": round(statistics.median(b["cpu"]) / statistics.median(a["cpu"]), 3),
            }
        )
    print(table(rows, list(rows[0])), flush=True)
    payload: dict[str, Any] = {"against": args.against, "head": args.head, "rows": rows, "runs": runs}
    print(f"wrote {write_json('records_ab', payload)}")


if __name__ == "__main__":
    main()
