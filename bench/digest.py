"""The cost of a chunk's input digest on the ingest path, against the work the server does anyway.

Every committed chunk is stored with the digest of its decoded input (``service/digest.py``), so a
re-sent sequence can be judged on any replica. It runs on the worker thread beside the engine, over
the staging block's rows, so its cost is CPU per MiB received. Measured here in one run, per 1,024-row
block of C=3,000 float32 scores (12 MiB, int64 labels and ids), medians of ``--repeats`` calls:

- the digest as ingest takes it (XXH3-128, ``scores_digest``), and the same canonical bytes through
  hashlib's blake2b (16-byte digest) and sha256, the alternatives in the standard library;
- the staging copy of the block's rows (one ``np.copyto`` a chunk, as ``StagingBlock.append``);
- the engine's reduction of the block (``ChunkReducer.reduce``, eager and, with ``--compiled``, the
  compiled backend), the bulk of the server's own CPU per sample.

Run: ``python -m bench.digest [--repeats 9] [--compiled]``; writes bench/results/digest.json.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

import numpy as np
import torch

from bench.common import environment, measure, ratio, table, write_json
from evalstream.service.digest import scores_digest
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.reducer import ChunkReducer

ROWS, CLASSES = 1024, 3000
MIB = 1 << 20


def _hashlib(name: str, scores: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16) if name == "blake2b" else hashlib.new(name)
    for part in (scores, labels, ids):
        h.update(part.data)
    return h.digest()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compiled", action="store_true", help="also time the compiled engine backend")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(ROWS, CLASSES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, ROWS).astype(np.int64)
    ids = np.arange(ROWS, dtype=np.int64)
    mib = (scores.nbytes + labels.nbytes + ids.nbytes) / MIB
    staging = np.empty_like(scores)
    chunk_rows = 87  # one ~1 MiB message at C=3,000 float32

    def copy() -> None:
        for start in range(0, ROWS, chunk_rows):
            np.copyto(staging[start : start + chunk_rows], scores[start : start + chunk_rows])

    cases: dict[str, Any] = {
        "digest xxh3-128 (ingest)": lambda: scores_digest(scores, labels, ids, torch.float32),
        "blake2b-16": lambda: _hashlib("blake2b", scores, labels, ids),
        "sha256": lambda: _hashlib("sha256", scores, labels, ids),
        "staging copy": copy,
    }
    backends = ["eager", "compiled"] if args.compiled else ["eager"]
    for backend in backends:
        reducer = ChunkReducer(CLASSES, EngineConfig(backend=backend))
        tensors = (torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(ids))
        cases[f"engine ({backend})"] = lambda r=reducer, t=tensors: r.reduce(*t)
    timings = {name: measure(fn, repeat=args.repeats, warmup=2) for name, fn in cases.items()}
    engine = timings["engine (eager)"].median
    digest = timings["digest xxh3-128 (ingest)"].median
    rows = [
        {
            "work": name,
            "ms/block": t.median * 1e3,
            "ms/MiB": t.median * 1e3 / mib,
            "x digest": ratio(t.median, digest),
            "share of engine (eager)": ratio(t.median, engine),
        }
        for name, t in timings.items()
    ]
    print(f"{ROWS} rows x C={CLASSES} float32 + int64 labels and ids = {mib:.2f} MiB a block")
    print(table(rows, ["work", "ms/block", "ms/MiB", "x digest", "share of engine (eager)"]))
    payload = {"environment": environment(), "mib_per_block": mib, "rows": rows, "timings": timings}
    write_json("digest", payload)
    return payload


if __name__ == "__main__":
    main()
