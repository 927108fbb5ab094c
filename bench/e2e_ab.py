"""End-to-end cost of a change: ``bench.e2e`` of two git revisions, same session, interleaved.

Each revision is exported with ``git archive`` into a temporary folder, its stubs generated from
its own proto, and its service/ and client/ linked under evalstream/ (the installed layout), so
each side runs its own server, client and benchmark code. Rounds alternate the sides (A, B, A,
B, ...), each a fresh ``python -m bench.e2e`` process, so the load of a shared machine hits both
alike. Reported per side: the median over every run of samples/s and of client and server CPU
microseconds per sample (which load inflates much less than the rate), their spread (min-max),
and the ratios B / A of the medians.

    .venv/bin/python -m bench.e2e_ab --against 20c70d9 [--head HEAD] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import table, write_json

ROOT = Path(__file__).resolve().parent.parent
METRICS = {
    "samples/s": "samples_per_s",
    "client cpu us/sample": "client_cpu_us_per_sample",
    "server cpu us/sample": "server_cpu_us_per_sample",
}


def export_revision(rev: str, dest: Path) -> Path:
    """The whole of ``rev`` in ``dest``, laid out as the installed package, stubs generated."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "tools/gen_proto.py"], cwd=dest, check=True, capture_output=True)
    for part in ("service", "client"):
        link = dest / "evalstream" / part
        if not link.exists():
            link.symlink_to(Path("..") / part)
    return dest


def run_side(tree: Path, e2e_args: list[str]) -> list[dict[str, Any]]:
    """One ``bench.e2e`` process in ``tree``; its runs (one dict per measured repeat)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # found before the editable install's finder
    probe = "import evalstream.service.ingest as m; print(m.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=env, check=True, capture_output=True)
    assert where.stdout.decode().startswith(str(tree)), f"{tree} imported {where.stdout.decode()}"
    subprocess.run(
        [sys.executable, "-m", "bench.e2e", *e2e_args], cwd=tree, env=env, check=True, capture_output=True
    )
    found = json.loads((tree / "bench" / "results" / "e2e.json").read_text())
    return [run for row in found["rows"] for run in row["runs"]]


def _spread(values: list[float]) -> str:
    """Median (min-max); rates without decimals, microseconds with two."""
    f = ",.0f" if statistics.median(values) >= 1000 else ".2f"
    return f"{statistics.median(values):{f}} ({min(values):{f}}-{max(values):{f}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision of side A (before)")
    ap.add_argument("--head", default="HEAD", help="git revision of side B (after)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    e2e_args = ["--samples", str(args.samples), "--repeats", str(args.repeats), "--ranks", "1"]
    e2e_args += ["--dtypes", args.dtype]
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="evalstream-e2e-ab-") as tmp:
        trees = {
            "A": export_revision(args.against, Path(tmp) / "a"),
            "B": export_revision(args.head, Path(tmp) / "b"),
        }
        for _ in range(args.rounds):
            for side, tree in trees.items():
                runs[side] += run_side(tree, e2e_args)
    row: dict[str, Any] = {"dtype": args.dtype, "runs per side": len(runs["A"])}
    for name, key in METRICS.items():
        a = [r[key] for r in runs["A"]]
        b = [r[key] for r in runs["B"]]
        row[f"A {name}"] = _spread(a)
        row[f"B {name}"] = _spread(b)
        row[f"B/A {name}"] = round(statistics.median(b) / statistics.median(a), 3)
    print(table([row], list(row)), flush=True)
    payload = {"against": args.against, "head": args.head, "rounds": args.rounds, "row": row, "runs": runs}
    print(f"wrote {write_json('e2e_ab', payload)}")


if __name__ == "__main__":
    main()
