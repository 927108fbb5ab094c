"""CompareModels' bootstrap at scale: one million samples, three candidates, 1,000 replicates.

Times the paired Poisson bootstrap (service/compare) of the difference to the
best for several primary metrics, the whole ``compare_models`` call (alignment,
ranking, bootstrap, McNemar, causes, diagnosis, recommendation with its
calibrated-NLL bootstrap, per-class changes, response) with the recommendation
on (the default) and off, the per-class changes of one pair alone, and, for reference, the
classic multinomial bootstrap with uint32 indices and gather-sums (timed on a
few replicates and scaled to 1,000, since running it in full takes minutes).

Records are synthetic (no logits needed): 3,000 Zipf-distributed classes, top-1
correct with a per-candidate probability, per-sample NLL and a temperature grid.

    .venv/bin/python -m bench.bootstrap [--samples N] [--replicates R] [--repeat K] [--quick]
    .venv/bin/python -m bench.bootstrap --before REV [--rounds K]   # compare_models, REV vs this tree
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import measure, table, write_json
from evalstream.service.compare import CandidateInput, CompareOptions, compare_models
from evalstream.service.compare.bootstrap import paired_bootstrap
from evalstream.service.compare.classes import class_changes
from evalstream.service.compare.statistics import statistic_for
from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics

C = 3000
CONFIG = EngineConfig(device="cpu")
METRICS = ("nll", "accuracy_top1", "ece", "balanced_accuracy", "calibrated_nll")


def synthetic_records(n: int, accuracy: float, sharpness: float, seed: int) -> Records:
    """Plausible per-sample records: right with probability ``accuracy``, NLL growing with sharpness."""
    rng = np.random.default_rng(seed)
    prior = (np.arange(C) + 1.0) ** -1.1
    label = rng.choice(C, size=n, p=prior / prior.sum()).astype(np.int32)
    correct = rng.random(n) < accuracy
    other = rng.integers(0, C, size=n, dtype=np.int32)
    pred = np.where(correct, label, other).astype(np.int32)
    rank = np.where(correct, 0, rng.integers(1, 50, size=n)).astype(np.uint16)
    confidence = np.clip(rng.beta(2 + 3 * sharpness, 2, size=n), 1e-3, 1.0).astype(np.float32)
    nll = np.where(correct, -np.log(confidence), sharpness * rng.exponential(2.0, size=n)).astype(np.float32)
    inv_t = np.asarray(CONFIG.inverse_temperatures)
    # The temperature model's columns (docs/metrics.md) of a row whose other classes form 8 groups of
    # (C - 1) / 8 classes at offsets below the maximum: L(b), b L'(b), b^2 L''(b), exactly.
    offsets = -np.sort(rng.exponential(2.0 * sharpness, size=(n, 8)), axis=1)
    cols: dict[str, list[np.ndarray]] = {"log_rest": [], "rest_slope": [], "rest_curvature": []}
    for b in inv_t:
        log_terms = np.log((C - 1) / 8) + b * offsets
        lse = np.logaddexp.reduce(log_terms, axis=1)
        w = np.exp(log_terms - lse[:, None])
        mean = (w * offsets).sum(axis=1)
        cols["log_rest"].append(lse)
        cols["rest_slope"].append(b * mean)
        cols["rest_curvature"].append(b * b * (w * (offsets - mean[:, None]) ** 2).sum(axis=1))
    model = {k: np.stack(v, axis=1) for k, v in cols.items()}
    return Records(
        sample_id=rng.permutation(n).astype(np.int64),
        label=label,
        pred=pred,
        rank=rank,
        ties=np.zeros(n, np.uint32),
        nll=nll,
        confidence=confidence,
        brier=(1.0 - confidence) ** 2,
        entropy=nll * 0.8,
        log_rest=model["log_rest"].astype(np.float32),
        rest_slope=model["rest_slope"].astype(np.float16),
        rest_curvature=model["rest_curvature"].astype(np.float16),
        inverse_temperatures=inv_t,
    )


def candidates(n: int) -> list[CandidateInput]:
    out = []
    for i, (acc, sharp) in enumerate(((0.60, 1.0), (0.62, 1.4), (0.61, 1.1))):
        rec = synthetic_records(n, acc, sharp, seed=i)
        metrics = compute_metrics(rec, C, CONFIG).scalars()
        out.append(CandidateInput("bench", f"m{i}", "validation", 1, f"e{i}", C, metrics, rec))
    return out


def classic_bootstrap_seconds(x: list[np.ndarray], replicates: int) -> float:
    """Seconds for the index-gather bootstrap of a mean difference, `replicates` replicates."""
    rng = np.random.default_rng(0)
    n = len(x[0])
    t0 = time.perf_counter()
    for _ in range(replicates):
        idx = rng.integers(0, n, size=n, dtype=np.uint32)
        base = x[0][idx].sum()
        for other in x[1:]:
            _ = other[idx].sum() - base
    return time.perf_counter() - t0


# Run in a subprocess with the working directory (and PYTHONPATH) at a source tree: times that tree's
# compare_models on this module's synthetic candidates, a few times, and prints the seconds as JSON.
_TIMER = """
import json, sys, time
from bench.bootstrap import candidates
from evalstream.service.compare import CompareOptions, compare_models
import evalstream.service.compare as where
n, reps, runs = (int(a) for a in sys.argv[1:4])
cands = candidates(n)
seconds = []
for _ in range(runs):
    t0 = time.perf_counter()
    compare_models(cands, CompareOptions(replicates=reps))
    seconds.append(time.perf_counter() - t0)
print(json.dumps({"module": where.__file__, "seconds": seconds}))
"""


def before_after(rev: str, n: int, reps: int, rounds: int, runs: int = 2) -> dict[str, Any]:
    """compare_models of git revision ``rev`` and of this tree in one session, alternating
    processes (before, after, before, after, ...) so that load on a shared machine hits both alike.

    ``rev`` is exported with ``git archive`` to a temporary directory, its stubs generated, and
    its service/ and client/ linked under evalstream/ so that they, not this tree's, are imported."""
    root = Path(__file__).resolve().parents[1]
    out: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="evalstream-before-") as old:
        subprocess.run(f"git archive {rev} | tar -x -C {old}", shell=True, check=True, cwd=root)
        subprocess.run([sys.executable, "tools/gen_proto.py"], cwd=old, check=True, capture_output=True)
        for part in ("service", "client"):
            os.symlink(f"../{part}", f"{old}/evalstream/{part}")
        for _ in range(rounds):
            for label, tree in (("before", old), ("after", str(root))):
                done = subprocess.run(
                    [sys.executable, "-c", _TIMER, str(n), str(reps), str(runs)],
                    cwd=tree,
                    env={**os.environ, "PYTHONPATH": tree},
                    check=True,
                    capture_output=True,
                    text=True,
                )
                found = json.loads(done.stdout.strip().splitlines()[-1])
                assert found["module"].startswith(tree), found["module"]
                out[label] += found["seconds"]
    before, after = statistics.median(out["before"]), statistics.median(out["after"])
    return {
        "rev": rev,
        "seconds": out,
        "median_before": before,
        "median_after": after,
        "ratio": after / before,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bootstrap", description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="100k samples, 200 replicates, one repeat")
    ap.add_argument(
        "--before",
        metavar="REV",
        help="only time compare_models of git revision REV against this tree, alternating (before/after)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="before/after rounds with --before")
    args = ap.parse_args(argv)
    n, reps, repeat = (100_000, 200, 1) if args.quick else (args.samples, args.replicates, args.repeat)
    if args.before:
        found = before_after(args.before, n, reps, args.rounds)
        print(
            f"compare_models, {n:,} samples x 3 candidates x {reps:,} replicates: before ({args.before}) "
            f"median {found['median_before']:.2f} s, after {found['median_after']:.2f} s, "
            f"ratio {found['ratio']:.2f}"
        )
        print(f"wrote {write_json('bootstrap_before_after', {'samples': n, 'replicates': reps, **found})}")
        return 0
    cands = candidates(n)
    aligned = [c.records.dedupe()[0] for c in cands if c.records is not None]
    rows: list[dict[str, Any]] = []
    for name in METRICS:
        stats = [statistic_for(name, r, C, CONFIG) for r in aligned]
        assert all(s is not None for s in stats)
        timing = measure(lambda s=stats: paired_bootstrap(s, 0, n, reps, 0.95, 0), repeat=repeat, warmup=0)  # type: ignore[misc]
        rows.append({"what": f"paired bootstrap, {name}", "seconds": timing.median, "timing": timing})
    options = CompareOptions(replicates=reps)
    full = measure(lambda: compare_models(cands, options), repeat=repeat, warmup=0)
    rows.append({"what": "compare_models (nll, everything)", "seconds": full.median, "timing": full})
    off = CompareOptions(replicates=reps, recommendation="off")
    plain = measure(lambda: compare_models(cands, off), repeat=repeat, warmup=0)
    rows.append(
        {"what": "compare_models (nll, recommendation off)", "seconds": plain.median, "timing": plain}
    )
    per_class = measure(
        lambda: class_changes("m0", "m1", aligned[0], aligned[1], C, 0.05), repeat=repeat, warmup=0
    )
    rows.append({"what": "per-class changes, one pair", "seconds": per_class.median, "timing": per_class})
    probe = max(5, reps // 50)
    x = [r.nll.astype(np.float64) for r in aligned]
    classic = classic_bootstrap_seconds(x, probe) * reps / probe
    rows.append({"what": f"classic index bootstrap, nll (scaled from {probe})", "seconds": classic})
    print(f"{n:,} samples x {len(cands)} candidates x {reps:,} replicates")
    print(table(rows, ["what", "seconds"]))
    path = write_json(
        "bootstrap",
        {"samples": n, "candidates": len(cands), "replicates": reps, "rows": rows},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
