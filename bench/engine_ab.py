"""Engine cost of a change: this tree's ChunkReducer against a git revision's, same run, interleaved.

Each round runs one fresh process per side (A = the revision, B = this tree), alternating, each
timing ``ChunkReducer.reduce`` over the same [rows, 3000] data in 4,096-row chunks, one torch
thread, for every backend and score dtype. The revision's ``service/`` is exported with
``git archive`` into a temporary folder laid out as the installed package (``evalstream.service``),
so both sides import the code by the same names. Reported: each side's median samples/s over the
rounds and the ratio B / A of the medians (same machine, same minute: the noise of a shared
machine hits both sides alike).

    .venv/bin/python -m bench.engine_ab --against 839b782 [--rounds 5] [--rows 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from bench.common import table, write_json

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, time
import torch
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.reducer import ChunkReducer
import evalstream.service.engine as engine
torch.set_num_threads(1)
rows, backend, dtype_name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dtype = getattr(torch, dtype_name)
gen = torch.Generator().manual_seed(0)
y = torch.randint(0, 3000, (rows,), generator=gen)
z = torch.randn(rows, 3000, generator=gen) * 2.0
z[torch.arange(rows), y] += 4.0 * torch.rand(rows, generator=gen)
z = z.to(dtype)
reducer = ChunkReducer(3000, EngineConfig(device="cpu", backend=backend))
assert reducer.active_backend(dtype) == backend, "backend unavailable"
chunks = [(z[i : i + 4096], y[i : i + 4096]) for i in range(0, rows, 4096)]
for a, b in chunks[:2]:
    reducer.reduce(a, b)
best = []
for _ in range(3):
    t0 = time.perf_counter()
    recs = [reducer.reduce(a, b) for a, b in chunks]
    best.append(time.perf_counter() - t0)
size = recs[0].nbytes_per_sample()
print(json.dumps({"seconds": min(best), "record_bytes": size, "file": engine.__file__}))
"""


def export_revision(rev: str, dest: Path) -> Path:
    """``rev``'s service/ as dest/evalstream/service, beside this tree's generated stubs."""
    archive = subprocess.run(["git", "archive", rev, "service"], cwd=ROOT, check=True, capture_output=True)
    pkg = dest / "evalstream"
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(pkg, filter="data")
    (pkg / "__init__.py").write_text((ROOT / "evalstream" / "__init__.py").read_text())
    (pkg / "v1").symlink_to(ROOT / "evalstream" / "v1")
    return dest


def run_side(pythonpath: str | None, rows: int, backend: str, dtype: str) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # found before the editable install's finder (appended last)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(rows), backend, dtype],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=pythonpath or ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision for side A")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--backends", default="eager,compiled")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="evalstream-ab-") as tmp:
        old = str(export_revision(args.against, Path(tmp)))
        for backend in args.backends.split(","):
            for dtype in args.dtypes.split(","):
                a_rates: list[float] = []
                b_rates: list[float] = []
                sizes: dict[str, float] = {}
                for _ in range(args.rounds):
                    for side, path in (("A", old), ("B", None)):
                        got = run_side(path, args.rows, backend, dtype)
                        want_root = path if path is not None else str(ROOT)
                        assert got["file"].startswith(want_root), f"side {side} imported {got['file']}"
                        (a_rates if side == "A" else b_rates).append(args.rows / got["seconds"])
                        sizes[side] = got["record_bytes"]
                a, b = statistics.median(a_rates), statistics.median(b_rates)
                results.append(
                    {
                        "backend": backend,
                        "dtype": dtype,
                        "A_samples_per_s": round(a),
                        "B_samples_per_s": round(b),
                        "B_over_A": round(b / a, 3),
                        "A_spread": f"{min(a_rates):.0f}-{max(a_rates):.0f}",
                        "B_spread": f"{min(b_rates):.0f}-{max(b_rates):.0f}",
                        "A_record_bytes": sizes["A"],
                        "B_record_bytes": sizes["B"],
                    }
                )
                print(table(results[-1:], list(results[-1])), flush=True)
    write_json(
        "engine_ab", {"against": args.against, "rounds": args.rounds, "rows": args.rows, "rows_out": results}
    )


if __name__ == "__main__":
    main()
